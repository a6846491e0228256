"""``longtail generate``: a guided (or unguided) synthetic ImageFolder with a manifest; resumable, shardable."""

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
    chunk: int = 64  # images written per step of the resumable loop
    generator_check: GeneratorCheckSpec = field(default_factory=GeneratorCheckSpec)


GENERATION_KEYS = ("generator", "classifier", "guidance", "classes", "per_class", "counts_file", "seed")


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
    """Generate (or resume) the dataset; under ``accelerate launch`` every process takes its share of jobs."""
    from accelerate import PartialState

    from ..data.store import SyntheticStore
    from ..generate import generate_dataset

    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    out = Path(cfg.out)
    if state.is_main_process:
        identity = check_same_settings(out, cfg, GENERATION_KEYS, "generate")
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
    jobs = job_list(cfg, names)
    # the generator check: does the generator draw these classes at all? (before any long work)
    job_generator_check(cfg, out, ldm, names, loaded, jobs, is_main=state.is_main_process, show=show, log=log)
    if state.is_main_process:  # only once everything loaded and checked: a failed start leaves no config behind
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        write_json(out / "settings.json", {"settings_sha256": identity, "keys": list(GENERATION_KEYS)})
    state.wait_for_everyone()
    gs = cfg.generator
    meta = {"weight": cfg.guidance.weight if guidance else 0.0,
            "model": f"{gs.kind}:{gs.model or 'shipped'}", "num_steps": gs.num_steps, "cfg_scale": gs.cfg_scale}
    stats = generate_dataset(
        ldm, jobs, out, names, meta=meta, process_index=state.process_index, num_processes=state.num_processes,
        chunk=cfg.chunk, show=show and state.is_main_process,
        classifier=bridged_classifier(loaded) if loaded is not None else None, guidance=guidance,
        num_steps=gs.num_steps, cfg_scale=gs.cfg_scale, negative_prompt=gs.negative_prompt,
        batch_size=gs.batch_size, guide_decode=guide, record_signal=cfg.guidance.signal if loaded else None,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        total = SyntheticStore(out).merge()
        log(f"{out}: {total} images in the manifest ({stats['written']} written now by process 0, "
            f"{stats['skipped']} already there) over {state.num_processes} process(es)")
        stats["total"] = total
    return stats


