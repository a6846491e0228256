"""One ``Condition`` type for every comparison (paper Tables 1-4 analogs), parsed once, one meaning everywhere.

Grammar (``Condition.parse``):

* ``none`` -- fine-tune on real data only, on the same schedule (the real-only control);
* ``unguided`` -- + synthetic images from the class prompts, no guidance;
* ``ltg[:<signal>][@<weight>]`` -- + Longtail-Guided images (predicted clean latent, Eq. 8-11); the signal
  defaults to the run's guidance signal and the weight to its calibrated (or configured) weight;
* ``naive[:<signal>][@<weight>]`` -- + images guided on the decoded *noisy* latent (the A.7 ablation);
* ``bestof[:<signal>][@<N>]`` -- + unguided images selected after the fact: N times the count is generated and,
  per class, the 1/N with the highest signal is kept (N defaults to 4); the same final count as every other
  condition, no gradients. If it matches LTG, guidance is not worth its cost;
* ``gif`` -- + unguided images from GIF's 40 prompt templates per class;
* ``introspect`` -- + unguided images from the Longtail Introspection prompts of the run;
* ``aug:<name>`` -- real data only, fine-tuned with that baseline augmentation (``longtail.augment``).

A generating condition may end in ``+judge`` (``ltg+judge``, ``unguided+judge``): images the run's judge does
not recognise as their class are dropped and replaced, so the count stays exact. Apply it to ``unguided`` too as
the control, so the comparison stays fair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .sampling import GuidanceConfig

KINDS = ("none", "unguided", "ltg", "naive", "bestof", "gif", "introspect", "aug")
BEST_OF_DEFAULT = 4
LABELS = {
    "none": "+ fine-tune, no synth",
    "unguided": "+ unguided synthetic",
    "gif": "+ prompt-tuned (GIF)",
    "introspect": "+ introspection prompts",
}


class ConditionError(ValueError):
    """A condition string that does not follow the grammar of ``longtail.conditions``."""


def _grammar() -> str:
    from .augment import AUGMENTATIONS

    return ("use none, unguided, ltg[:<signal>][@<weight>], naive[:<signal>][@<weight>], bestof[:<signal>][@<N>], "
            f"gif, introspect or aug:<{'|'.join(AUGMENTATIONS)}>")


@dataclass(frozen=True)
class Condition:
    """A parsed comparison condition. ``text`` is what the user wrote; ``kind`` one of ``KINDS``."""

    text: str
    kind: str
    signal: str | None = None  # guided kinds: an explicit signal, else the run's
    weight: float | None = None  # guided kinds: an explicit weight, else the run's
    augment: str | None = None  # aug: the augmentation's name
    factor: int | None = None  # bestof: N, candidates generated per kept image
    judge_filter: bool = False  # "+judge": keep only images the judge recognises, replace the rest

    @classmethod
    def parse(cls, text: str) -> Condition:
        """Parse ``text``; raises ``ConditionError`` naming it and the grammar when it does not fit."""
        from .augment import AUGMENTATIONS
        from .signals import SIGNALS

        text = str(text).strip()
        if text.endswith("+judge"):
            inner = cls.parse(text[: -len("+judge")])
            if inner.kind == "bestof":
                raise ConditionError(f"condition {text!r}: best-of-N already selects; +judge goes with ltg, naive, "
                                     "unguided, gif or introspect")
            if not inner.synthetic:
                raise ConditionError(f"condition {text!r}: +judge filters generated images; {inner.text!r} makes none")
            return replace(inner, text=text, judge_filter=True)
        head, sep, rest = text.partition(":")
        if head in ("none", "unguided", "gif", "introspect") and not sep:
            return cls(text, head)
        if head == "aug":
            if rest in AUGMENTATIONS:
                return cls(text, "aug", augment=rest)
            raise ConditionError(f"unknown augmentation in condition {text!r}: {_grammar()}")
        kind, at, weight_text = head.partition("@")
        if kind in ("ltg", "naive", "bestof"):
            if sep:  # ltg:<signal>[@w]
                signal, at, weight_text = rest.partition("@")
                if signal not in SIGNALS:
                    raise ConditionError(f"unknown signal {signal!r} in condition {text!r}; signals: {sorted(SIGNALS)}")
            else:
                signal = None
            if kind == "bestof":
                return cls(text, kind, signal=signal, factor=_factor(text, weight_text) if at else BEST_OF_DEFAULT)
            weight = None
            if at:
                try:
                    weight = float(weight_text)
                except ValueError:
                    raise ConditionError(f"condition {text!r}: weight {weight_text!r} is not a number") from None
            return cls(text, kind, signal=signal, weight=weight)
        raise ConditionError(f"unknown mining condition {text!r}: {_grammar()}")

    @property
    def guided(self) -> bool:
        return self.kind in ("ltg", "naive")

    @property
    def synthetic(self) -> bool:
        """Whether the condition adds generated images (``none`` and ``aug:*`` do not)."""
        return self.kind not in ("none", "aug")

    @property
    def dirname(self) -> str:
        """The condition's folder name in a run (``ltg:total@3`` -> ``ltg_total_w3``)."""
        return self.text.replace(":", "_").replace("@", "_w").replace("+", "_")

    def guidance(self, base: GuidanceConfig, weight_of: Callable[[str], float]) -> GuidanceConfig | None:
        """The sampler's guidance for this condition, or None for unguided generation.

        ``base`` carries the run's signal, window and options; ``weight_of(signal)`` gives the calibrated (or
        configured) weight of a signal when the condition names none.
        """
        if not self.guided:
            return None
        signal = self.signal or base.signal
        weight = self.weight if self.weight is not None else weight_of(signal)
        return replace(base, signal=signal, weight=float(weight), on_noisy=self.kind == "naive")

    def selection_signal(self, base: GuidanceConfig) -> str:
        """The signal that ranks best-of-N candidates (the condition's, else the run's)."""
        return self.signal or base.signal

    def label(self, guidance: dict | None = None) -> str:
        """A table label; ``guidance`` (``{"signal", "weight"}``) as resolved for the run, when known."""
        if self.judge_filter:
            return replace(self, judge_filter=False).label(guidance) + " + judge filter"
        if self.kind == "aug":
            return f"+ aug {self.augment}"
        if self.kind == "ltg":
            return f"+ LTG ({guidance['signal']}, w={guidance['weight']:g})" if guidance else "+ LTG"
        if self.kind == "bestof":
            return f"+ best-of-{self.factor} ({self.signal})" if self.signal else f"+ best-of-{self.factor}"
        if self.kind == "naive":
            return f"+ naive guidance (w={guidance['weight']:g})" if guidance else "+ naive guidance (z_t)"
        return LABELS[self.kind]


def _factor(text: str, value: str) -> int:
    try:
        factor = int(value)
    except ValueError:
        raise ConditionError(f"condition {text!r}: N {value!r} is not a whole number") from None
    if factor < 2:
        raise ConditionError(f"condition {text!r}: N must be >= 2 (N = 1 is the unguided condition)")
    return factor


def parse_conditions(texts: list[str]) -> list[Condition]:
    """Parse a config's condition list; every bad entry and any duplicate is named in one error."""
    errors, seen, out = [], set(), []
    for text in texts:
        try:
            cond = Condition.parse(text)
        except ConditionError as err:
            errors.append(str(err))
            continue
        if cond.dirname in seen:
            errors.append(f"condition {text!r} is listed twice")
        seen.add(cond.dirname)
        out.append(cond)
    if errors:
        raise ConditionError("; ".join(errors))
    return out


def condition_label(text: str, guidance: dict | None = None) -> str:
    """``Condition.parse(text).label(guidance)``; the text itself when it does not parse (old runs)."""
    try:
        return Condition.parse(text).label(guidance)
    except ConditionError:
        return text
