"""``longtail calibrate``: sweep guidance weights per signal, pick one by the paper's rule, keep the evidence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import dump_config
from ..files import write_json
from ..models.classifiers import bridged_classifier
from ..sampling import GuidanceConfig
from .common import (
    ClassifierSpec,
    GeneratorSpec,
    check_generator_classes,
    check_guidance,
    check_same_settings,
    class_list,
    load_classifier_spec,
    load_generator,
    pick_device,
    with_sampling_defaults,
)
from .generate import GenerateConfig, job_list
from .generator_check import GeneratorCheckSpec, job_generator_check


@dataclass
class CalibrateConfig:
    """``longtail calibrate``: sweep guidance weights per signal and pick one by the paper's rule."""

    out: str = "runs/calibrate"
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    signals: list[str] = field(default_factory=lambda: ["total"])
    weights: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0, 30.0])
    per_class: int = 4
    classes: list[str] | None = None
    min_p_ratio: float = 0.5
    seed: int = 1234
    device: str = "auto"
    generator_check: GeneratorCheckSpec = field(default_factory=GeneratorCheckSpec)


# the settings that determine a calibration's results (device does not; generator.batch_size is free too)
CALIBRATION_KEYS = ("generator", "classifier", "guidance", "signals", "weights", "per_class", "classes",
                    "min_p_ratio", "seed")


def run_calibrate(cfg: CalibrateConfig, show: bool = True, log: Callable[[str], None] = print) -> dict:
    """Sweep, choose, and record the evidence (``calibration.json``, a grid per signal)."""
    from ..calibrate import calibrate
    from ..generate import generate

    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    identity = check_same_settings(out, cfg, CALIBRATION_KEYS, "calibrate")
    ldm, guide, known = load_generator(cfg.generator, device)
    loaded = load_classifier_spec(cfg.classifier, device)
    names = class_list(loaded, known, cfg.classifier.class_names)
    check_generator_classes(cfg.generator, known, names)
    for s in cfg.signals:
        check_guidance(GuidanceConfig(s, 1.0), loaded)
    gen_cfg = GenerateConfig(generator=cfg.generator, classes=cfg.classes, per_class=cfg.per_class, seed=cfg.seed)
    jobs = job_list(gen_cfg, names)
    # the generator check: does the generator draw these classes at all? (before any long work)
    job_generator_check(cfg, out, ldm, names, loaded, jobs, show=show, log=log)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    classifier = bridged_classifier(loaded)
    gs = cfg.generator

    def generate_fn(guidance: GuidanceConfig | None):
        return generate(ldm, jobs, classifier=classifier, guidance=guidance, num_steps=gs.num_steps,
                        cfg_scale=gs.cfg_scale, negative_prompt=gs.negative_prompt, batch_size=gs.batch_size,
                        guide_decode=guide, show=show,
                        desc=f"{guidance.signal} w={guidance.weight:g}" if guidance else "unguided")

    result = calibrate(generate_fn, torch.tensor([j.class_id for j in jobs]), cfg.signals, cfg.weights, out,
                       base=cfg.guidance, min_p_ratio=cfg.min_p_ratio, per_class_in_grid=min(2, cfg.per_class),
                       log=log)
    result["class_names"] = names
    result["settings_sha256"] = identity
    write_json(out / "calibration.json", result)
    return result
