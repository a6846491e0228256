"""What every job shares: which generator and classifier, how to load them, sampling defaults per kind.

Generators are the embedded default or a Stable Diffusion checkpoint; classifiers are anything
``models.classifiers`` loads, or a ``classifier.json`` written next to a run's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, to_dict
from ..files import write_json
from ..models.classifiers import LoadedClassifier, load_classifier
from ..models.ldm import LatentDiffusion
from ..sampling import GuidanceConfig, check_num_steps


def settings_hash(settings: dict) -> str:
    """SHA-256 (hex) of the settings that determine a job's results, as canonical JSON (sorted keys): two
    configs hash alike exactly when those settings are equal. Settings that do not change results (batch size,
    device, progress bars) must be left out of ``settings`` by the caller."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# change speed and memory, not what is generated (a guided image can differ in its last bits: the gradient's
# batched floating-point sums)
FREE_SETTINGS = ("generator.batch_size",)


def _drop(settings: dict, dotted: tuple[str, ...]) -> dict:
    """``settings`` without the nested keys named ``a.b``."""
    out = json.loads(json.dumps(settings, default=str))
    for path in dotted:
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def changed_keys(old: object, new: object, prefix: str = "",
                 normalise: Callable[[dict, dict], tuple[dict, dict]] | None = None) -> list[str]:
    """The dotted keys (``generator.lora``) at which a finished job's setting ``old`` (from its config.yaml)
    differs from ``new``. A key that ``old`` lacks was added to the tool after that job ran, with a default that
    keeps the earlier behaviour, so it does not count. ``normalise(old, new)`` may rewrite each pair of mappings
    before they are compared (equal spellings of one setting)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix] if old != new else []
    if normalise is not None:
        old, new = normalise(old, new)
    keys: list[str] = []
    for key, value in old.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        keys += [name] if key not in new else changed_keys(value, new[key], name, normalise)
    return keys


def check_same_settings(out: Path, cfg: object, keys: tuple[str, ...], job: str,
                        free: tuple[str, ...] = FREE_SETTINGS) -> str:
    """Refuse to write ``job`` results into ``out`` when it holds results of other settings.

    ``out/config.yaml`` (the config of the job that wrote ``out``) is compared with ``cfg`` on ``keys``, the
    settings that determine results, less the ``free`` ones (dotted paths, e.g. ``generator.batch_size``).
    Returns the settings' :func:`settings_hash`, which the job stores with its results. Raises ConfigError
    naming the differing keys; nothing is written here."""
    new = _drop({k: to_dict(cfg).get(k) for k in keys}, free)
    previous = out / "config.yaml"
    if previous.is_file():
        old = _drop(yaml.safe_load(previous.read_text()) or {}, free)
        changed = [k for k in keys if changed_keys(old.get(k), new[k], k)]
        if changed:
            raise ConfigError(f"{out} holds {job} results of other settings ({', '.join(changed)} differ from "
                              f"{previous}); use another --out, or the same settings")
    return settings_hash(new)


@dataclass
class GeneratorSpec:
    """Which latent diffusion model, how to sample it, and how to prompt it."""

    kind: str = "embedded"  # embedded | sd
    # embedded: a generator directory, or a shipped one by name: clean (None) or nuisance; sd: a path or hub id
    model: str | None = None
    dtype: str = "fp32"
    vae_dtype: str | None = None
    scheduler: str = "ddim"  # ddim | dpm++ | euler
    height: int | None = None
    width: int | None = None
    decoder_checkpointing: bool = False
    local_files_only: bool = True
    guide_decoder: str | None = None  # a distilled surrogate (longtail distill-decoder) or a TAESD directory
    # a LoRA on the UNet (longtail adapt-generator: its directory or .safetensors file) at lora_scale (0: none)
    lora: str | None = None
    lora_scale: float = 1.0
    vae: str | None = None  # a replacement VAE directory (e.g. a fixed fp16 VAE for SDXL)
    use_t5: bool = True  # SD3 / SD3.5: false leaves out the T5 text encoder
    guidance_scale: float | None = None  # FLUX.1-dev's distilled guidance (None: the family's default, 3.5)
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
    """``gs`` with every unset sampling setting (num_steps, cfg_scale, batch_size) filled from its kind's defaults.

    Every job calls it before loading a model, so it also checks ``num_steps`` against the scheduler's training
    timesteps, read from the generator's ``scheduler/scheduler_config.json`` when it is a local directory
    (``ConfigError`` naming the setting and the allowed range).
    """
    if gs.kind not in SAMPLING_DEFAULTS:
        raise ConfigError(f"generator.kind must be 'embedded' or 'sd', got {gs.kind!r}")
    defaults = SAMPLING_DEFAULTS[gs.kind]
    if gs.kind == "sd":  # each diffusers family's own steps and CFG (models.families.FAMILY_DEFAULTS)
        from ..models.families import family_defaults

        family = family_defaults(gs.model)
        defaults = {**defaults, "num_steps": family["num_steps"], "cfg_scale": family["cfg_scale"]}
    gs = replace(gs, **{k: type(v)(v) for k, v in defaults.items() if getattr(gs, k) is None})
    try:
        check_num_steps(gs.num_steps, scheduler_train_timesteps(gs), "generator.num_steps (--steps)")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return gs


def scheduler_train_timesteps(gs: GeneratorSpec) -> int | None:
    """``num_train_timesteps`` from the generator's scheduler config without loading it (None when the model is
    not a local directory, e.g. a hub id, or the file does not say)."""
    if gs.kind == "embedded":
        from ..models.tiny import generator_dir

        root = generator_dir(gs.model)
    else:
        root = Path(gs.model) if gs.model else None
    config = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if config is None or not config.is_file():
        return None
    value = json.loads(config.read_text()).get("num_train_timesteps")
    return int(value) if value is not None else None


@dataclass
class ClassifierSpec:
    """``spec``: torchvision name, ``timm:<name>``, ``hf:<local dir>`` (transformers), ``module:function``, or a
    ``classifier.json`` of a run."""

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
    for key in ("checkpoint", "heads", "class_names"):  # the file's own paths are relative to it
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str(path.parent / data[key])
    # given settings win; a path given with them (command line, config) stays relative to the working directory
    merged = {**data, **{k: v for k, v in to_dict(cs).items() if k != "spec" and v not in (None, {}, [])}}
    unknown = set(merged) - set(ClassifierSpec.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return ClassifierSpec(**merged)


def portable_spec(spec: str) -> str:
    """``spec`` with the local path inside it made absolute, so a ``classifier.json`` written from one working
    directory loads from any other: ``hf:<dir>`` and ``path/file.py:function`` (when the path exists); other
    specs (torchvision / ``timm:`` names, ``package.module:function``) unchanged."""
    if spec.startswith("hf:") and Path(spec[3:]).expanduser().exists():
        return f"hf:{Path(spec[3:]).expanduser().resolve()}"
    file, sep, function = spec.rpartition(":")
    if sep and file.endswith(".py") and Path(file).expanduser().is_file():
        return f"{Path(file).expanduser().resolve()}:{function}"
    return spec


def write_classifier_json(directory: Path, spec: str, checkpoint: str | None, *, model_kwargs: dict | None = None,
                          num_classes: int | None = None, class_names: list[str] | None = None,
                          preprocess: dict | None = None, heads: str | None = None, num_heads: int | None = None,
                          head_name: str | None = None) -> Path:
    """Describe a saved classifier so ``--classifier <dir>/classifier.json`` loads it; relative paths
    (``checkpoint``, ``heads``) are relative to ``directory``, class names go to ``class_names.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    names_file = None
    if class_names:
        write_json(directory / "class_names.json", list(class_names))
        names_file = "class_names.json"
    data = {"spec": portable_spec(spec), "checkpoint": checkpoint, "model_kwargs": model_kwargs or {},
            "num_classes": num_classes,
            "class_names": names_file, "preprocess": preprocess, "heads": heads, "num_heads": num_heads,
            "head_name": head_name}
    return write_json(directory / "classifier.json", data)


def load_classifier_spec(cs: ClassifierSpec, device: torch.device) -> LoadedClassifier:
    cs = resolve_classifier_spec(cs)
    if cs.spec is None:
        raise ConfigError("no classifier given: set classifier.spec (--classifier)")
    return load_classifier(cs.spec, num_classes=cs.num_classes, checkpoint=cs.checkpoint, heads=cs.heads,
                           num_heads=cs.num_heads, head_name=cs.head_name, class_names_file=cs.class_names,
                           preprocess=cs.preprocess, model_kwargs=cs.model_kwargs, device=device)


def load_generator(gs: GeneratorSpec, device: torch.device) -> tuple[LatentDiffusion, Callable | None, list[str]]:
    """The generator, an optional surrogate guidance decoder, and the class names the generator knows (if any)."""
    from ..models import surrogate

    if gs.kind == "embedded":
        from ..models.tiny import generator_dir, load_tiny_generator

        root = generator_dir(gs.model)
        ldm = load_tiny_generator(root, device=device)
        known = json.loads((root / "longtail_generator.json").read_text()).get("class_names", [])
    elif gs.kind == "sd":
        from ..models.stable_diffusion import load_stable_diffusion

        if not gs.model:
            raise ConfigError("generator.kind=sd needs generator.model (a diffusers directory or a hub id)")
        ldm = load_stable_diffusion(gs.model, dtype=gs.dtype, vae_dtype=gs.vae_dtype, device=device,
                                    scheduler=gs.scheduler, height=gs.height, width=gs.width,
                                    local_files_only=gs.local_files_only,
                                    decoder_checkpointing=gs.decoder_checkpointing, vae=gs.vae,
                                    use_t5=gs.use_t5, guidance_scale=gs.guidance_scale)
        known = []
    else:
        raise ConfigError(f"generator.kind must be 'embedded' or 'sd', got {gs.kind!r}")
    if gs.lora:
        from ..models.lora import load_lora

        load_lora(ldm.unet, gs.lora, gs.lora_scale)
        ldm.unet.to(device)
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
        from ..data.imagefolder import read_class_names

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


def check_generator_classes(gs: GeneratorSpec, known: list[str], class_names: list[str]) -> None:
    """The embedded generator draws only the classes it was trained on (``known``): refuse others by name. A
    Stable Diffusion generator, or a prompt file, is prompted with any name."""
    unknown = [n for n in class_names if n not in known]
    if gs.kind == "embedded" and known and unknown and not gs.prompt_file:
        raise ConfigError(f"the embedded generator knows only {known}; it cannot draw {unknown}. Train one on "
                          "your images (`longtail train-generator`) or use Stable Diffusion (--sd DIR)")


def check_guidance(guidance: GuidanceConfig | None, loaded: LoadedClassifier | None) -> None:
    """Fail before any sampling when the guidance cannot run with this classifier."""
    from ..heads import EpistemicClassifier
    from ..signals import get_signal

    if guidance is None:
        return
    if loaded is None:
        raise ConfigError("guidance needs a classifier (--classifier), or use --weight 0 for unguided data")
    if get_signal(guidance.signal).needs_heads and not isinstance(loaded.model, EpistemicClassifier):
        raise ConfigError(f"signal {guidance.signal!r} needs an Epistemic Head: pass its weights (--heads; in mine "
                          "also heads.epochs=N trains one) or use a signal without one (--signal entropy / energy; "
                          "in mine guidance.signal=entropy)")


