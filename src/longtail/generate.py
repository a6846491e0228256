"""Batched generation of (class, index) jobs with a ``LatentDiffusion`` model, guided or not.

Every image's seed is a pure function of (base seed, class, index), so a job gives the same image whatever
batch or process it runs in. ``generate`` keeps results in memory; ``longtail.data.store`` writes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .heads import ClassifierOutput
from .models.ldm import LatentDiffusion
from .sampling import GuidanceConfig, SampleResult, initial_latents, sample


@dataclass(frozen=True)
class Job:
    """One image to make: intended class, its index within the class, its seed and prompt."""

    class_id: int
    index: int
    seed: int
    prompt: str


def image_seed(base_seed: int, class_id: int, index: int) -> int:
    """A deterministic 63-bit seed per (base seed, class, index)."""
    return (base_seed * 1_000_003 + class_id * 999_983 + index * 7919 + 12345) % (2**63 - 1)


def plan_jobs(
    counts: Sequence[int], prompts: Callable[[int, int], str], base_seed: int = 0, start: Sequence[int] | None = None
) -> list[Job]:
    """Jobs for ``counts[c]`` images of each class c; ``prompts(class, index)`` gives each prompt.

    ``start[c]`` offsets the indices (a later mining round continues where the last one stopped).
    """
    start = start or [0] * len(counts)
    return [
        Job(c, i, image_seed(base_seed, c, i), prompts(c, i))
        for c, n in enumerate(counts)
        for i in range(start[c], start[c] + n)
    ]


def even_counts(total: int, num_classes: int) -> list[int]:
    """``total`` images spread evenly over classes (the first ``total % C`` classes get one more)."""
    return [total // num_classes + (1 if c < total % num_classes else 0) for c in range(num_classes)]


@dataclass
class Generated:
    """Images ``[N, C, H, W]`` (generator range) with their jobs and, when a classifier ran, its records."""

    images: Tensor
    jobs: list[Job]
    labels: Tensor
    signal: Tensor | None
    p_class: Tensor | None
    pred: Tensor | None
    output: ClassifierOutput | None
    signal_name: str | None
    seconds: float
    nonfinite: int = 0

    def __len__(self) -> int:
        return len(self.jobs)


def _cat(values: list[Tensor | None]) -> Tensor | None:
    return torch.cat(values) if values and all(v is not None for v in values) else None


def generate(
    ldm: LatentDiffusion,
    jobs: Sequence[Job],
    *,
    classifier: Callable[[Tensor], Tensor | ClassifierOutput] | None = None,
    guidance: GuidanceConfig | None = None,
    num_steps: int = 25,
    cfg_scale: float = 3.0,
    negative_prompt: str = "",
    batch_size: int = 64,
    record_signal: str | None = None,
    show: bool = True,
    desc: str = "generate",
) -> Generated:
    """Generate every job in batches; guided when ``guidance`` is given (needs ``classifier``)."""
    jobs = list(jobs)
    started = time.perf_counter()
    results: list[SampleResult] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not show, leave=False):
        batch = jobs[start : start + batch_size]
        cond = ldm.encode_prompts([j.prompt for j in batch])
        uncond = ldm.encode_prompts([negative_prompt] * len(batch)) if cfg_scale != 1.0 else None
        latents = initial_latents([j.seed for j in batch], ldm.latent_shape, ldm.device, ldm.dtype)
        labels = torch.tensor([j.class_id for j in batch], device=ldm.device)
        results.append(sample(ldm.denoise, ldm.scheduler, ldm.decode, cond, latents, uncond=uncond,
                              num_steps=num_steps, cfg_scale=cfg_scale, classifier=classifier, labels=labels,
                              guidance=guidance, record_signal=record_signal))
    outputs = [r.output for r in results]
    output = None
    if outputs and all(o is not None for o in outputs):
        output = ClassifierOutput(logits=torch.cat([o.logits for o in outputs]),
                                  head_logits=_cat([o.head_logits for o in outputs]))
    return Generated(
        images=torch.cat([r.images for r in results]) if results else torch.empty(0),
        jobs=jobs,
        labels=torch.tensor([j.class_id for j in jobs], dtype=torch.long),
        signal=_cat([r.signal for r in results]),
        p_class=_cat([r.p_class for r in results]),
        pred=_cat([r.pred for r in results]),
        output=output,
        signal_name=results[0].signal_name if results else None,
        seconds=time.perf_counter() - started,
        nonfinite=sum(r.nonfinite for r in results),
    )
