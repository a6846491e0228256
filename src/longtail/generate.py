"""Batched generation of (class, index) jobs with a ``LatentDiffusion`` model, guided or not.

Every image's seed is a pure function of (base seed, class, index), so a job gives the same image whatever
batch or process it runs in. ``generate`` keeps results in memory; ``longtail.data.store`` writes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.store import SyntheticStore, check_class_folders, to_uint8
from .models.ldm import LatentDiffusion
from .outputs import ClassifierOutput
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


# GIF's prompt tuning (Zhang et al. 2023), as the LTG paper's A.1 lists it: 5 nouns x 8 adjectives = 40 prompts.
GIF_NOUNS = ("image", "oil painting", "cartoon image", "sketch", "pencil sketch")
GIF_ADJECTIVES = ("", "colorful", "stylized", "bright", "sheared", "solarized", "posterized", "high-contrast")


def gif_prompts(class_name: str) -> list[str]:
    """The 40 prompt-tuned variants for a class, e.g. "a colorful oil painting of a coat".

    The paper writes the template as "a <noun> <adjective> of <class>"; we put the adjective first so the
    prompt reads as English; the 40 (noun, adjective) pairs are the same.
    """
    article = "an" if class_name[:1].lower() in "aeiou" else "a"
    return [" ".join(f"a {adj} {noun} of {article} {class_name}".split()) for noun in GIF_NOUNS for adj in GIF_ADJECTIVES]


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
    prompts: list[str] | None = None  # per job, the text the encoder saw (its start, when over the limit)

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
    guide_decode: Callable[[Tensor], Tensor] | None = None,
    show: bool = True,
    desc: str = "generate",
) -> Generated:
    """Generate every job in batches; guided when ``guidance`` is given (needs ``classifier``).

    ``guidance.project`` (MPGD manifold projection) gets ``ldm.encode`` as its encoder automatically.
    """
    jobs = list(jobs)
    seen = getattr(ldm, "prompt_seen", None)  # a LatentDiffusion warns about (and reports) cut prompts
    encode = ldm.encode if guidance is not None and guidance.project else None
    started = time.perf_counter()
    results: list[SampleResult] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not show, leave=False):
        batch = jobs[start : start + batch_size]
        cond = ldm.encode_prompts([j.prompt for j in batch])
        uncond = ldm.encode_prompts([negative_prompt] * len(batch)) if cfg_scale != 1.0 else None
        latents = initial_latents([j.seed for j in batch], ldm.latent_shape, ldm.device, ldm.dtype)
        labels = torch.tensor([j.class_id for j in batch], device=ldm.device)
        results.append(sample(denoiser=ldm.denoise, scheduler=ldm.scheduler, decode=ldm.decode, cond=cond,
                              latents=latents, uncond=uncond, num_steps=num_steps, cfg_scale=cfg_scale,
                              classifier=classifier, labels=labels, guidance=guidance,
                              record_signal=record_signal, guide_decode=guide_decode, encode=encode))
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
        prompts=[seen(j.prompt) for j in jobs] if seen is not None else None,
    )


def job_id(job: Job, prefix: str = "") -> str:
    """The file stem of a job's image: ``<prefix>c<class>_<index>``, unique per (class, index)."""
    return f"{prefix}c{job.class_id}_{job.index:05d}"


def records(gen: Generated, class_names: Sequence[str], meta: dict, prefix: str = "") -> list[dict]:
    """One manifest row per generated image (``longtail.data.store.COLUMNS``).

    ``prompt`` is the text the generator's encoder saw; when its token limit cut the job's prompt,
    ``prompt_full`` holds the whole prompt (empty otherwise)."""
    rows = []
    per_image = gen.seconds / max(1, len(gen))
    for i, job in enumerate(gen.jobs):
        seen = gen.prompts[i] if gen.prompts is not None else job.prompt
        rows.append({
            "id": job_id(job, prefix), "class_id": job.class_id, "class_name": class_names[job.class_id],
            "index": job.index, "seed": job.seed, "prompt": seen,
            "prompt_full": job.prompt if seen != job.prompt else "", "signal_name": gen.signal_name or "",
            "signal": f"{float(gen.signal[i]):.6f}" if gen.signal is not None else "",
            "p_class": f"{float(gen.p_class[i]):.6f}" if gen.p_class is not None else "",
            "pred": int(gen.pred[i]) if gen.pred is not None else "", "seconds": f"{per_image:.4f}", **meta,
        })
    return rows


def generate_dataset(
    ldm: LatentDiffusion,
    jobs: Sequence[Job],
    out: str | Path,
    class_names: Sequence[str],
    *,
    meta: dict,
    prefix: str = "",
    process_index: int = 0,
    num_processes: int = 1,
    chunk: int = 64,
    show: bool = True,
    store: object | None = None,
    **generate_kwargs: object,
) -> dict[str, object]:
    """Generate ``jobs`` into an ImageFolder store at ``out``, resumably and shardably.

    This process takes ``jobs[process_index::num_processes]`` and skips those already in the store; images are
    written ``chunk`` at a time, so a kill loses at most one chunk. With several processes each writes its own
    manifest part; call ``SyntheticStore(out).merge()`` once all are done. ``prefix`` starts every image id
    (e.g. the mining round). Class names that would share a folder (``check_class_folders``) are refused
    before anything is written. ``store``: write there instead (any store with ``in`` and ``add``, e.g. a
    ``longtail.data.store_formats.ShardedStore``). Every row records the VAE's dtype (``vae_dtype``); a chunk
    with non-finite images is refused (``check_finite``). Returns ``assigned`` / ``skipped`` / ``written``
    counts and the generator's ``decode_fallbacks`` notes.
    """
    check_class_folders(class_names)
    if store is None:
        store = SyntheticStore(out, part=process_index if num_processes > 1 else None)
    mine = list(jobs)[process_index::num_processes]
    todo = [j for j in mine if job_id(j, prefix) not in store]
    written = 0
    desc = str(generate_kwargs.pop("desc", f"generate [{process_index}]"))
    for start in tqdm(range(0, len(todo), chunk), desc=desc, disable=not show, leave=False):
        gen = generate(ldm, todo[start : start + chunk], show=False, **generate_kwargs)
        check_finite(gen)
        rows = records(gen, class_names, {**meta, "vae_dtype": vae_dtype(ldm)}, prefix)
        written += store.add(to_uint8(gen.images), rows)
    return {"assigned": len(mine), "skipped": len(mine) - len(todo), "written": written,
            "decode_fallbacks": list(getattr(ldm, "decode_fallbacks", []))}


def vae_dtype(ldm: object) -> str:
    """The dtype the generator's VAE decodes in now (``float16`` / ``bfloat16``, or ``float32`` after a
    non-finite half-precision decode made it fall back), for the manifest's ``vae_dtype``."""
    dtype = getattr(getattr(ldm, "vae", None), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def check_finite(gen: Generated) -> None:
    """Refuse a chunk with images that are not finite (NaN / inf) even after the VAE's fp32 fallback: nothing of
    it is written, so no black image enters a dataset. ``DataError`` naming the first ids."""
    from .data.datasets import DataError

    ok = torch.isfinite(gen.images).flatten(1).all(dim=1).tolist()
    bad = [job_id(j) for j, fine in zip(gen.jobs, ok, strict=True) if not fine]
    if bad:
        raise DataError(f"{len(bad)} of {len(gen.jobs)} generated images are not finite even after the VAE's "
                        f"fp32 fallback (ids {', '.join(bad[:5])}); nothing of this chunk was written: try "
                        "generator.dtype=fp32 or generator.vae=<a fixed fp16 VAE>")
