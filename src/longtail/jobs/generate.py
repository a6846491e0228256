"""``longtail generate``: a guided (or unguided) synthetic ImageFolder with a manifest; resumable, shardable.

Under ``accelerate launch`` the processes share one store (manifest parts, merged at the end). With ``shard``
(``--shard i/n`` or ``auto``, ``longtail.jobs.shards``) the run makes only its share of the job list into
``<out>/parts/shard-<i>-of-<n>/``; ``longtail merge <out>`` folds the shards. ``format`` picks the store:
``png`` (default: ImageFolder + manifest.csv), ``parquet`` or ``webdataset`` (``longtail.data.store_formats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import ConfigError, dump_config
from ..data.store import check_class_folders
from ..files import write_json
from ..models.classifiers import bridged_classifier
from ..sampling import GuidanceConfig
from .common import (
    ClassifierSpec,
    GeneratorSpec,
    active,
    check_generator_classes,
    check_guidance,
    check_same_settings,
    class_list,
    load_classifier_spec,
    load_generator,
    read_counts,
    with_sampling_defaults,
)
from .generator_check import GeneratorCheckSpec, job_generator_check


@dataclass
class GenerateConfig:
    """``longtail generate``: classes x images (or a count file), guided or not, into an ImageFolder store."""

    out: str = "runs/generate"
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    classes: list[str] | None = None  # a subset of the class names (default: all)
    per_class: int = 10
    counts_file: str | None = None
    seed: int = 0
    device: str = "auto"
    chunk: int = 64  # images written per step of the resumable loop (one data file per chunk when sharded)
    generator_check: GeneratorCheckSpec = field(default_factory=GeneratorCheckSpec)
    shard: str | None = None  # i/n (0-based) or auto: only this share of the jobs, into <out>/parts/
    format: str = "png"  # png (ImageFolder + manifest.csv) | parquet | webdataset


GENERATION_KEYS = ("generator", "classifier", "guidance", "classes", "per_class", "counts_file", "seed")
# ``shard`` and ``format`` decide where the images go, not what they are; the store's format is checked on its own


def plan_counts(jobs: list, num_classes: int) -> list[int]:
    """Images per class of a job list from :func:`job_list` (indices ``0 .. n-1`` per class): the plan
    ``shard.json`` records, from which ``longtail merge`` rebuilds every id (:func:`planned_ids`)."""
    counts = [0] * num_classes
    for job in jobs:
        counts[job.class_id] += 1
    return counts


def planned_ids(counts: list[int]) -> list[str]:
    """The ids of a plan, in job-list order (``longtail.generate.job_id`` of class c, index i)."""
    from ..generate import Job, job_id

    return [job_id(Job(c, i, 0, "")) for c, n in enumerate(counts) for i in range(n)]


def job_list(cfg: GenerateConfig, class_names: list[str]) -> list:
    from ..generate import plan_jobs
    from ..prompts import job_prompts, prompt_table

    counts = read_counts(cfg.counts_file, class_names) if cfg.counts_file else [cfg.per_class] * len(class_names)
    if cfg.classes:
        unknown = sorted(set(cfg.classes) - set(class_names))
        if unknown:
            raise ConfigError(f"classes {unknown} are not among the classifier's classes {class_names}")
        counts = [n if name in cfg.classes else 0 for n, name in zip(counts, class_names, strict=True)]
    table = prompt_table(class_names, cfg.generator.prompt_template, cfg.generator.prompt_file)
    return plan_jobs(counts, job_prompts(table), base_seed=cfg.seed)


def run_generate(cfg: GenerateConfig, show: bool = True, log: Callable[[str], None] = print) -> dict:
    """Generate (or resume) the dataset; under ``accelerate launch`` every process takes its share of jobs.

    With ``cfg.shard`` only that shard's jobs, into its part folder (``longtail.jobs.shards``). Raises
    ConfigError for a bad shard or format, or an output (or part) folder of other settings or format."""
    from accelerate import PartialState

    from ..data.store_formats import check_format, open_store
    from ..generate import generate_dataset
    from .shards import SHARD_JSON, parse_shard, part_dir

    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    shard = parse_shard(cfg.shard)
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    out = Path(cfg.out)
    root = part_dir(out, shard) if shard is not None else out
    alone = shard is not None and shard.source == "torchrun"  # one process per shard: no barrier, no split
    is_main, index, count = (True, 0, 1) if alone else (state.is_main_process, state.process_index,
                                                        state.num_processes)
    if shard is not None:
        cfg = replace(cfg, shard=shard.text)  # recorded resolved: a re-run with this config.yaml redoes this shard
    try:
        check_format(root, cfg.format)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if is_main:
        identity = check_same_settings(root, cfg, GENERATION_KEYS, "generate")
        if shard is not None:
            check_same_settings(out, cfg, GENERATION_KEYS, "generate")
    ldm, guide, known = load_generator(cfg.generator, device)
    loaded = load_classifier_spec(cfg.classifier, device) if cfg.classifier.spec else None
    names = class_list(loaded, known, cfg.classifier.class_names)
    try:
        check_class_folders(names)  # one folder per class: names that share one would mix their images
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_generator_classes(cfg.generator, known, names)
    guidance = active(cfg.guidance)
    check_guidance(guidance, loaded)
    every = job_list(cfg, names)
    jobs = shard.take(every) if shard is not None else every
    # the generator check: does the generator draw these classes at all? (before any long work)
    job_generator_check(cfg, root, ldm, names, loaded, jobs, is_main=is_main, show=show, log=log)
    if is_main:  # only once everything loaded and checked: a failed start leaves no config behind
        root.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, root / "config.yaml")
        write_json(root / "settings.json", {"settings_sha256": identity, "keys": list(GENERATION_KEYS)})
        if shard is not None:
            write_json(root / SHARD_JSON, {"shard": shard.index, "num_shards": shard.count,
                                           "settings_sha256": identity, "format": cfg.format, "class_names": names,
                                           "counts": plan_counts(every, len(names)), "jobs": len(jobs)})
    if not alone:
        state.wait_for_everyone()
    gs = cfg.generator
    meta = {"weight": cfg.guidance.weight if guidance else 0.0,
            "model": f"{gs.kind}:{gs.model or 'shipped'}", "num_steps": gs.num_steps, "cfg_scale": gs.cfg_scale}
    store = open_store(root, cfg.format, part=index if count > 1 else None)
    stats = generate_dataset(
        ldm, jobs[index::count], root, names, meta=meta, chunk=cfg.chunk, show=show and is_main, store=store,
        desc="generate",
        classifier=bridged_classifier(loaded) if loaded is not None else None, guidance=guidance,
        num_steps=gs.num_steps, cfg_scale=gs.cfg_scale, negative_prompt=gs.negative_prompt,
        batch_size=gs.batch_size, guide_decode=guide, record_signal=cfg.guidance.signal if loaded else None,
    )
    if not alone:
        state.wait_for_everyone()
    if is_main:
        total = open_store(root, cfg.format).merge()
        where = (f"; shard {shard.text} ({shard.source}); when every shard is done: longtail merge {out}"
                 if shard is not None else "")
        log(f"{root}: {total} images in the {'manifest' if cfg.format == 'png' else cfg.format + ' store'} "
            f"({stats['written']} written now by process 0, {stats['skipped']} already there) over {count} "
            f"process(es){where}")
        stats["total"] = total
        for note in stats["decode_fallbacks"]:
            log(f"warning: {note}")
    return stats
