"""Config-driven jobs behind the CLI: ``generate`` and ``calibrate`` on any generator and classifier.

A job is one dataclass config (YAML file + ``--set`` overrides + flags) and one function. Generators are the
embedded default or a Stable Diffusion checkpoint; classifiers are anything ``models.classifiers`` loads, or a
``classifier.json`` written by the demo / mining runs. The resolved config is written next to the outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from .config import ConfigError, dump_config, to_dict
from .models.classifiers import LoadedClassifier, bridged_classifier, load_classifier
from .models.ldm import LatentDiffusion
from .sampling import GuidanceConfig


@dataclass
class GeneratorSpec:
    """Which latent diffusion model, how to sample it, and how to prompt it."""

    kind: str = "embedded"  # embedded | sd
    model: str | None = None  # embedded: a generator directory (None: the shipped one); sd: a path or hub id
    dtype: str = "fp32"
    vae_dtype: str | None = None
    scheduler: str = "ddim"  # ddim | dpm++ | euler
    height: int | None = None
    width: int | None = None
    decoder_checkpointing: bool = False
    local_files_only: bool = True
    guide_decoder: str | None = None  # a distilled surrogate (longtail distill-decoder) or a TAESD directory
    prompt_template: str = "a photo of {a} {}"
    prompt_file: str | None = None
    negative_prompt: str = ""
    # unset (None): the kind's defaults, SAMPLING_DEFAULTS (see with_sampling_defaults)
    num_steps: int | None = None
    cfg_scale: float | None = None
    batch_size: int | None = None


# Sampling settings per generator kind: the embedded model was trained and measured at 20 DDIM steps and
# classifier-free guidance 3 (configs/demo.yaml); Stable Diffusion at the usual 50 steps and 7.5 (the paper's DDIM 50).
SAMPLING_DEFAULTS: dict[str, dict[str, float]] = {
    "embedded": {"num_steps": 20, "cfg_scale": 3.0, "batch_size": 100},
    "sd": {"num_steps": 50, "cfg_scale": 7.5, "batch_size": 8},
}


def with_sampling_defaults(gs: GeneratorSpec) -> GeneratorSpec:
    """``gs`` with every unset sampling setting (num_steps, cfg_scale, batch_size) filled from its kind's defaults."""
    if gs.kind not in SAMPLING_DEFAULTS:
        raise ConfigError(f"generator.kind must be 'embedded' or 'sd', got {gs.kind!r}")
    defaults = SAMPLING_DEFAULTS[gs.kind]
    return replace(gs, **{k: type(v)(v) for k, v in defaults.items() if getattr(gs, k) is None})


@dataclass
class ClassifierSpec:
    """``spec``: torchvision name, ``timm:<name>``, ``module:function``, or a ``classifier.json`` of a run."""

    spec: str | None = None
    checkpoint: str | None = None
    heads: str | None = None
    num_heads: int | None = None
    head_name: str | None = None
    class_names: str | None = None  # a file: JSON list or one name per line
    num_classes: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    preprocess: dict | None = None


def active(guidance: GuidanceConfig) -> GuidanceConfig | None:
    """The guidance to run, or None (the plain, cheaper sampler) when its weight is 0."""
    return guidance if guidance.weight != 0 else None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_classifier_spec(cs: ClassifierSpec) -> ClassifierSpec:
    """Expand a ``classifier.json`` (written next to a run's checkpoint) into a full spec; paths in it are
    relative to the JSON file."""
    if cs.spec is None or not cs.spec.endswith(".json"):
        return cs
    path = Path(cs.spec)
    if not path.is_file():
        raise ConfigError(f"classifier description {path} does not exist")
    data = json.loads(path.read_text())
    merged = {**data, **{k: v for k, v in to_dict(cs).items() if k != "spec" and v not in (None, {}, [])}}
    for key in ("checkpoint", "heads", "class_names"):
        if merged.get(key) and not Path(merged[key]).is_absolute():
            merged[key] = str(path.parent / merged[key])
    unknown = set(merged) - set(ClassifierSpec.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return ClassifierSpec(**merged)


def write_classifier_json(directory: Path, spec: str, checkpoint: str, *, model_kwargs: dict | None = None,
                          num_classes: int | None = None, class_names: list[str] | None = None,
                          preprocess: dict | None = None) -> Path:
    """Describe a saved classifier so ``--classifier <dir>/classifier.json`` loads it (class names inline)."""
    directory.mkdir(parents=True, exist_ok=True)
    names_file = None
    if class_names:
        (directory / "class_names.json").write_text(json.dumps(list(class_names)))
        names_file = "class_names.json"
    data = {"spec": spec, "checkpoint": checkpoint, "model_kwargs": model_kwargs or {}, "num_classes": num_classes,
            "class_names": names_file, "preprocess": preprocess}
    path = directory / "classifier.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def load_classifier_spec(cs: ClassifierSpec, device: torch.device) -> LoadedClassifier:
    cs = resolve_classifier_spec(cs)
    if cs.spec is None:
        raise ConfigError("no classifier given: set classifier.spec (--classifier)")
    return load_classifier(cs.spec, num_classes=cs.num_classes, checkpoint=cs.checkpoint, heads=cs.heads,
                           num_heads=cs.num_heads, head_name=cs.head_name, class_names_file=cs.class_names,
                           preprocess=cs.preprocess, model_kwargs=cs.model_kwargs, device=device)


def load_generator(gs: GeneratorSpec, device: torch.device) -> tuple[LatentDiffusion, Callable | None, list[str]]:
    """The generator, an optional surrogate guidance decoder, and the class names the generator knows (if any)."""
    from .models import surrogate

    if gs.kind == "embedded":
        from .models.tiny import ASSETS_DIR, load_tiny_generator

        root = Path(gs.model) if gs.model else ASSETS_DIR
        ldm = load_tiny_generator(root, device=device)
        known = json.loads((root / "longtail_generator.json").read_text()).get("class_names", [])
    elif gs.kind == "sd":
        from .models.stable_diffusion import load_stable_diffusion

        if not gs.model:
            raise ConfigError("generator.kind=sd needs generator.model (a diffusers directory or a hub id)")
        ldm = load_stable_diffusion(gs.model, dtype=gs.dtype, vae_dtype=gs.vae_dtype, device=device,
                                    scheduler=gs.scheduler, height=gs.height, width=gs.width,
                                    local_files_only=gs.local_files_only,
                                    decoder_checkpointing=gs.decoder_checkpointing)
        known = []
    else:
        raise ConfigError(f"generator.kind must be 'embedded' or 'sd', got {gs.kind!r}")
    guide = None
    if gs.guide_decoder:
        path = Path(gs.guide_decoder)
        if (path / "surrogate.json").is_file():
            guide = surrogate.surrogate_decode(surrogate.load_surrogate(path).to(device), ldm.scaling_factor)
        else:
            guide = surrogate.load_tiny_autoencoder(path, device=device)
    return ldm, guide, known


def class_list(loaded: LoadedClassifier | None, known: list[str], names_file: str | None) -> list[str]:
    if names_file:
        from .data.imagefolder import read_class_names

        return read_class_names(names_file)
    if loaded is not None and loaded.class_names:
        return list(loaded.class_names)
    if known:
        return list(known)
    raise ConfigError("class names unknown: pass a class-name file (--class-names)")


def read_counts(path: str | Path, class_names: list[str]) -> list[int]:
    """Per-class image counts from JSON ``{class: n}`` or lines ``class<TAB or spaces>n``; absent classes get 0."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"counts file {p} does not exist")
    text = p.read_text()
    if text.lstrip().startswith("{"):
        data = {str(k): int(v) for k, v in json.loads(text).items()}
    else:
        data = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            name, _, count = line.strip().rpartition(" ") if "\t" not in line else line.strip().partition("\t")
            try:
                data[name.strip()] = int(count)
            except ValueError:
                raise ConfigError(f"{p}:{n}: expected 'class count', got {line!r}") from None
    unknown = sorted(set(data) - set(class_names))
    if unknown:
        raise ConfigError(f"{p}: classes {unknown} are not among {class_names}")
    return [data.get(name, 0) for name in class_names]


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


GENERATION_KEYS = ("generator", "classifier", "guidance", "classes", "per_class", "counts_file", "seed")


def _check_same_run(out: Path, cfg: GenerateConfig) -> None:
    """Refuse to mix two different generation settings in one output directory."""
    previous = out / "config.yaml"
    if not previous.is_file():
        return
    old = yaml.safe_load(previous.read_text()) or {}
    new = to_dict(cfg)
    changed = [k for k in GENERATION_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"{out} was generated with different settings ({', '.join(changed)} differ from "
                          f"{previous}); use another --out or the same settings to resume")


def job_list(cfg: GenerateConfig, class_names: list[str]) -> list:
    from .generate import plan_jobs
    from .models.stable_diffusion import job_prompts, prompt_table

    counts = read_counts(cfg.counts_file, class_names) if cfg.counts_file else [cfg.per_class] * len(class_names)
    if cfg.classes:
        unknown = sorted(set(cfg.classes) - set(class_names))
        if unknown:
            raise ConfigError(f"classes {unknown} are not among the classifier's classes {class_names}")
        counts = [n if name in cfg.classes else 0 for n, name in zip(counts, class_names, strict=True)]
    table = prompt_table(class_names, cfg.generator.prompt_template, cfg.generator.prompt_file)
    return plan_jobs(counts, job_prompts(table), base_seed=cfg.seed)


def check_guidance(guidance: GuidanceConfig | None, loaded: LoadedClassifier | None) -> None:
    """Fail before any sampling when the guidance cannot run with this classifier."""
    from .heads import EpistemicClassifier
    from .signals import get_signal

    if guidance is None:
        return
    if loaded is None:
        raise ConfigError("guidance needs a classifier (--classifier), or use --weight 0 for unguided data")
    if get_signal(guidance.signal).needs_heads and not isinstance(loaded.model, EpistemicClassifier):
        raise ConfigError(f"signal {guidance.signal!r} needs an Epistemic Head: pass its weights (--heads) or use "
                          "--signal entropy / energy")


def run_generate(cfg: GenerateConfig, show: bool = True, log: Callable[[str], None] = print) -> dict:
    """Generate (or resume) the dataset; under ``accelerate launch`` every process takes its share of jobs."""
    from accelerate import PartialState

    from .data.store import SyntheticStore
    from .generate import generate_dataset

    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    out = Path(cfg.out)
    if state.is_main_process:
        _check_same_run(out, cfg)
    ldm, guide, known = load_generator(cfg.generator, device)
    loaded = load_classifier_spec(cfg.classifier, device) if cfg.classifier.spec else None
    names = class_list(loaded, known, cfg.classifier.class_names)
    guidance = active(cfg.guidance)
    check_guidance(guidance, loaded)
    jobs = job_list(cfg, names)
    if state.is_main_process:  # only once everything loaded and checked: a failed start leaves no config behind
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
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


def run_calibrate(cfg: CalibrateConfig, show: bool = True, log: Callable[[str], None] = print) -> dict:
    """Sweep, choose, and record the evidence (``calibration.json``, a grid per signal)."""
    from .calibrate import calibrate
    from .generate import generate

    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    ldm, guide, known = load_generator(cfg.generator, device)
    loaded = load_classifier_spec(cfg.classifier, device)
    names = class_list(loaded, known, cfg.classifier.class_names)
    for s in cfg.signals:
        check_guidance(GuidanceConfig(s, 1.0), loaded)
    gen_cfg = GenerateConfig(generator=cfg.generator, classes=cfg.classes, per_class=cfg.per_class, seed=cfg.seed)
    jobs = job_list(gen_cfg, names)
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
    tmp = out / "calibration.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "calibration.json")
    return result
