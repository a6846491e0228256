"""The paper's A.7 analysis: what the guidance input looks like along the sampling trajectory.

At each step, decode two things and compare them with real data (Fréchet distance on classifier features):
the *predicted clean* latent ``P(z_t)`` (Eq. 8, what LTG scores) and the *noisy* latent ``z_t`` itself (what
naive guidance would score). The paper finds the first looks like real data within ~10% of the steps, the
second only at the very end (Figure 15). Alongside, the mean signal of ``P(z_t)`` under w = 0 and under the
guided weight shows how early guidance separates the trajectories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from ..guidance import GuidanceConfig
from ..sampling import sample
from .distribution import frechet_distance


def trajectory_analysis(
    denoiser: Callable[[Tensor, Tensor, Tensor], Tensor],
    scheduler: object,
    decode: Callable[[Tensor], Tensor],
    cond: Tensor,
    latents: Tensor,
    features: Callable[[Tensor], Tensor],
    real_features: Tensor,
    classifier: Callable[[Tensor], object],
    guidance: GuidanceConfig,
    *,
    uncond: Tensor | None = None,
    cfg_scale: float = 1.0,
    num_steps: int = 20,
    steps: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """Per analysed step: FID of decoded ``P(z_t)`` and of decoded ``z_t`` to ``real_features [N, D]``, and the
    mean signal of ``P(z_t)`` unguided (w = 0) and guided (``guidance.weight``).

    ``features(images) -> [B, D]`` must be the extractor that produced ``real_features``. ``steps`` picks the
    step indices to analyse (default: all).
    """
    wanted = set(range(num_steps)) if steps is None else set(steps)
    decoded: dict[int, tuple[Tensor, Tensor, int]] = {}

    def capture(info: dict[str, Any]) -> None:
        if info["step"] in wanted:
            clean, noisy = decode(info["z0"]), decode(info["z"])
            decoded[info["step"]] = (features(clean), features(noisy), int(info["timestep"]))

    parts = dict(denoiser=denoiser, scheduler=scheduler, decode=decode, cond=cond, latents=latents, uncond=uncond,
                 cfg_scale=cfg_scale, num_steps=num_steps, classifier=classifier)
    unguided = sample(**parts, on_step=capture, guidance=replace(guidance, weight=0.0))
    guided = sample(**parts, guidance=guidance)
    signal_w0 = {r.step: r.mean_signal for r in unguided.trajectory}
    signal_w = {r.step: r.mean_signal for r in guided.trajectory}
    rows = []
    for i in sorted(decoded):
        clean_feats, noisy_feats, t = decoded[i]
        rows.append({
            "step": i,
            "fraction": i / num_steps,
            "timestep": t,
            "fid_predicted_clean": frechet_distance(clean_feats, real_features),
            "fid_noisy": frechet_distance(noisy_feats, real_features),
            "signal_w0": signal_w0.get(i, float("nan")),
            "signal_guided": signal_w.get(i, float("nan")),
        })
    return rows


def format_trajectory(rows: list[dict[str, float]], weight: float) -> str:
    """The A.7 table as printed by the tool."""
    lines = [f"{'step':>5}{'frac':>7}{'FID D(P(z_t))':>15}{'FID D(z_t)':>12}{'signal w=0':>12}"
             f"{f'signal w={weight:g}':>14}"]
    for r in rows:
        lines.append(f"{r['step']:>5}{r['fraction']:>7.2f}{r['fid_predicted_clean']:>15.2f}{r['fid_noisy']:>12.2f}"
                     f"{r['signal_w0']:>12.3f}{r['signal_guided']:>14.3f}")
    return "\n".join(lines)

