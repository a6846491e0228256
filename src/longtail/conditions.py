"""The comparison conditions of the embedded demo (paper Tables 1-4 analogs): names, labels, validation."""

from __future__ import annotations

CONDITION_LABELS = {
    "introspect": "+ introspection prompts",
    "none": "+ fine-tune, no synth",
    "unguided": "+ unguided synthetic",
    "gif": "+ prompt-tuned (GIF)",
    "naive": "+ naive guidance (z_t)",
}


def condition_label(cond: str, guided: dict | None = None) -> str:
    if cond == "ltg" or cond.startswith("ltg:"):
        return f"+ LTG ({guided['signal']}, w={guided['weight']:g})" if guided else "+ LTG"
    if cond == "naive" and guided:
        return f"+ naive guidance (w={guided['weight']:g})"
    if cond.startswith("aug:"):
        return f"+ aug {cond[4:]}"
    return CONDITION_LABELS.get(cond, cond)


def check_condition(cond: str) -> None:
    from .augment import AUGMENTATIONS
    from .signals import SIGNALS

    if cond in ("none", "unguided", "ltg", "gif", "naive", "introspect"):
        return
    if cond.startswith("aug:") and cond[4:] in AUGMENTATIONS:
        return
    if cond.startswith("ltg:"):
        signal, _, weight = cond[4:].partition("@")
        if signal in SIGNALS and (not weight or _is_float(weight)):
            return
    raise ValueError(f"unknown mining condition {cond!r}: use none, unguided, ltg, ltg:<signal>[@<weight>], gif, "
                     f"naive, introspect or aug:<{'|'.join(AUGMENTATIONS)}>")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def mean_std_cell(stat: dict[str, float], width: int = 14, digits: int = 3) -> str:
    """A right-aligned table cell: ``mean ± std`` over seeds, just the mean when there is one seed (``n``)."""
    text = f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")
    return f"{text:>{width}}"
