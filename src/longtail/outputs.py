"""``ClassifierOutput``: the one type every layer passes (logits, head logits, features).

Classifiers, guidance, the sampler, training and evaluation all exchange one forward pass as this dataclass;
``as_output`` lifts a plain-logits classifier's return value into it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ClassifierOutput:
    """One forward pass: base logits ``[B, C]``, head logits ``[B, K, C]`` (or None), head features ``[B, D]``."""

    logits: Tensor
    head_logits: Tensor | None = None
    features: Tensor | None = None


def as_output(out: Tensor | ClassifierOutput) -> ClassifierOutput:
    """Normalise what a classifier returns (plain logits or ``ClassifierOutput``) to ``ClassifierOutput``."""
    return out if isinstance(out, ClassifierOutput) else ClassifierOutput(logits=out)
