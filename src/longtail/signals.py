"""Longtail signals: differentiable scores of how rare or hard an input is for a classifier.

Convention (the one rule of this module): every signal maps logits to a score of shape ``[B]`` where
**higher means more longtail** (less confident, more uncertain). Inputs are either

* base logits ``[B, C]`` (one predictive distribution per example), or
* head logits ``[B, K, C]`` from K Epistemic Heads, read as K samples of the posterior predictive.

A ``[B, C]`` input is treated as ``K = 1``. Computation is in float32 or wider, through ``log_softmax``, so one-hot
or huge logits (1e4) give finite values and finite gradients. METHOD.md section 1 lists the formulas.

Regression heads use the variance forms (``variance_total`` etc.) on means and variances ``[B, K, D]``;
per-dimension variances are summed over ``D``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SignalFn = Callable[..., Tensor]


def _as_heads(logits: Tensor) -> Tensor:
    """``[B, C]`` -> ``[B, 1, C]``; ``[B, K, C]`` unchanged; half precision upcast to float32."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, C] or [B, K, C], got {tuple(logits.shape)}")
    return _upcast(logits)


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _entropy_from_log_probs(log_p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim of log-probabilities; ``0 * log 0 = 0`` by construction."""
    return -(log_p.exp() * log_p).sum(dim=-1)


def mean_log_probs(logits: Tensor) -> Tensor:
    """Log of the head-averaged predictive ``log mean_k softmax(l_k)``: ``[B, K, C]`` or ``[B, C]`` -> ``[B, C]``."""
    heads = _as_heads(logits)
    return torch.logsumexp(torch.log_softmax(heads, dim=-1), dim=1) - math.log(heads.shape[1])


def total(logits: Tensor) -> Tensor:
    """Total uncertainty ``H(mean_k p_k)`` (Eq. 4, left side): ``[B, K, C]`` or ``[B, C]`` -> ``[B]``."""
    return _entropy_from_log_probs(mean_log_probs(logits))


def aleatoric(logits: Tensor) -> Tensor:
    """Aleatoric uncertainty ``mean_k H(p_k)``: ``[B, K, C]`` or ``[B, C]`` -> ``[B]``."""
    return _entropy_from_log_probs(torch.log_softmax(_as_heads(logits), dim=-1)).mean(dim=1)


def epistemic(logits: Tensor) -> Tensor:
    """Epistemic uncertainty (mutual information) ``H(mean_k p_k) - mean_k H(p_k)``: ``[B, K, C]`` -> ``[B]``.

    Needs K >= 2 heads: with one head it is identically zero and would guide nowhere, so that is an error.
    Clamped at 0 (it is non-negative by Jensen; tiny negative values are rounding).
    """
    if logits.dim() != 3 or logits.shape[1] < 2:
        raise ValueError(
            f"epistemic needs head logits [B, K, C] with K >= 2 (an Epistemic Head), got {tuple(logits.shape)}"
        )
    return (total(logits) - aleatoric(logits)).clamp_min(0.0)


def entropy(logits: Tensor) -> Tensor:
    """Predictive entropy ``H(p)``, ``p = softmax(l)``; for ``[B, K, C]`` the entropy of the head average."""
    return total(logits)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``E = -T logsumexp(l / T)``: ``[B, C]`` -> ``[B]``; for ``[B, K, C]`` the mean over heads.

    Low-confidence inputs have small logits and so *high* energy: higher = more longtail, as for all signals.
    """
    if temperature <= 0:
        raise ValueError(f"energy temperature must be > 0, got {temperature}")
    heads = _as_heads(logits)
    return (-temperature * torch.logsumexp(heads / temperature, dim=-1)).mean(dim=1)


# --- regression (variance forms): means, variances [B, K, D] -> [B] ------------------------------------------


def _check_regression(means: Tensor, variances: Tensor) -> None:
    if means.dim() != 3 or means.shape != variances.shape:
        raise ValueError(
            "regression signals need means and variances of the same shape [B, K, D], got "
            f"{tuple(means.shape)} and {tuple(variances.shape)}"
        )


def variance_epistemic(means: Tensor, variances: Tensor) -> Tensor:
    """``Var_k(mu_k)`` summed over output dims: the heads' disagreement."""
    _check_regression(means, variances)
    return _upcast(means).var(dim=1, unbiased=False).sum(dim=-1)


def variance_aleatoric(means: Tensor, variances: Tensor) -> Tensor:
    """``mean_k sigma^2_k`` summed over output dims: the noise each head predicts."""
    _check_regression(means, variances)
    return _upcast(variances).mean(dim=1).sum(dim=-1)


def variance_total(means: Tensor, variances: Tensor) -> Tensor:
    """``Var_k(mu_k) + mean_k sigma^2_k`` (law of total variance) summed over output dims."""
    return variance_epistemic(means, variances) + variance_aleatoric(means, variances)


# --- registry ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """A named classification signal; ``needs_heads`` says whether it reads head logits ``[B, K, C]``."""

    name: str
    fn: SignalFn
    needs_heads: bool
    description: str

    def __call__(self, logits: Tensor, head_logits: Tensor | None = None) -> Tensor:
        """Score ``[B]`` from base logits ``[B, C]`` and, for head signals, head logits ``[B, K, C]``."""
        if self.needs_heads:
            if head_logits is None:
                raise ValueError(
                    f"signal {self.name!r} needs an Epistemic Head (head logits [B, K, C]); this classifier "
                    "has none: attach one with longtail.heads.EpistemicClassifier, or use 'entropy'/'energy'"
                )
            return self.fn(head_logits)
        return self.fn(logits)


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("entropy", entropy, False, "predictive entropy of the base classifier"),
        Signal("energy", energy, False, "free energy -logsumexp(logits) of the base classifier"),
        Signal("total", total, True, "total uncertainty H(mean_k p_k) of the Epistemic Head"),
        Signal("aleatoric", aleatoric, True, "aleatoric uncertainty mean_k H(p_k) of the Epistemic Head"),
        Signal("epistemic", epistemic, True, "epistemic uncertainty (mutual information) of the Epistemic Head"),
    )
}


def get_signal(name: str) -> Signal:
    """Look a signal up by name (``--signal epistemic``); unknown names list the known ones."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; choose one of {sorted(SIGNALS)}") from None
