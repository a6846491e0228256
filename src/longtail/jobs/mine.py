"""``longtail mine``: one job, many stages, one run directory. The demo is a config of it (configs/demo.yaml).

Stages, in the data flow's order; each reads and writes only the run directory, resumes on its own and can
be switched off:

1. generator -- the embedded model (trained if absent) or Stable Diffusion;
2. base -- per seed, the classifier: trained on the real data (``base.epochs > 0``) or the user's as given,
   then an Epistemic Head when asked (``heads.epochs > 0``); accuracy by Many / Medium / Few and detection
   AUROC per signal -> ``seed_<s>/base/``;
3. sweep -- signal and P(class) against the guidance weight, the paper's rule picks a weight per signal
   (``sweep.signals`` empty: skipped) -> ``sweep/``;
4. introspection -- keywords of guided vs unguided captions, refined prompts (when asked, or for the
   ``introspect`` condition) -> ``introspection/``;
5. mining -- per seed and condition (``longtail.conditions``), the loop: generate with the current classifier,
   fine-tune, evaluate -> ``seed_<s>/mining/<condition>/``;
6. trajectory (A.7) -> ``trajectory.json``; 7. distances (FID, precision / recall) -> ``distribution.json``;
8. summary -> ``metrics.json``, ``summary.txt``; 9. report -> ``report.html``.

Under ``accelerate launch`` generation is sharded and fine-tuning is data parallel; only the main process
writes checkpoints and metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..conditions import Condition, parse_conditions
from ..config import ConfigError, dump_config
from ..data.sources import DataSource, FashionMNISTLT, ImageFolderSource, Recipe
from ..data.store import SyntheticStore
from ..evaluation.metrics import accuracy_report, detection_report, signal_scores
from ..evaluation.stats import mean_std, mean_std_cell
from ..files import read_json, write_json
from ..heads import EpistemicClassifier, HeadsOnly
from ..mining import MiningConfig, allocate, mine, save_state
from ..models.classifiers import LoadedClassifier, bridged_classifier, input_channels
from ..outputs import ClassifierOutput
from ..sampling import GuidanceConfig
from .common import (
    ClassifierSpec,
    GeneratorSpec,
    active,
    check_guidance,
    load_classifier_spec,
    load_generator,
    with_sampling_defaults,
    write_classifier_json,
)

Log = Callable[[str], None]
METRICS = ("top1", "many", "medium", "few")


# --- config ------------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """The real data: ``source: imagefolder`` (``train`` / ``val`` folders) or ``fashion_mnist_lt`` (the
    embedded default, in memory; ``data_dir`` holds the IDX files, ``n_max`` / ``imbalance`` the profile)."""

    source: str = "imagefolder"
    train: str | None = None  # ImageFolder: <train>/<class>/<image>
    val: str | None = None
    class_names: str | None = None  # a file; default: the classifier's names, else the train folders
    allow_corrupt: bool = False  # skip unreadable images (each reported by path) instead of stopping
    data_dir: str | None = None
    n_max: int = 1000
    imbalance: float = 100.0
    data_seed: int = 0  # the long-tailed subset is fixed; run seeds vary training and generation
    many: int = 100
    few: int = 20


@dataclass
class FinetuneSpec(Recipe):
    """The fine-tuning recipe (paper A.1: Adam, cosine LR, rotation, crops, flips) and its data feed."""

    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class BaseSpec(FinetuneSpec):
    """The base classifier. ``epochs`` 0: the classifier as given; > 0: train ``classifier.spec``'s
    architecture from scratch on the real data, once per seed. ``ensemble`` > 0 also trains that many
    independent classifiers for the detection comparison (paper Figure 5)."""

    epochs: int = 0
    ensemble: int = 0


@dataclass
class HeadsSpec:
    """The Epistemic Head: ``epochs`` > 0 attaches ``num_heads`` copies of the trained head (+ ``init_noise``
    x std noise) to a classifier that has none and trains only them with the oracle loss (base frozen)."""

    num_heads: int = 5
    epochs: int = 0
    init_noise: float = 0.1
    lr: float = 1e-3


@dataclass
class ScheduleSpec:
    """When to generate, and how much. Epochs count fine-tuning epochs; generation happens at the start of
    each listed epoch (``generate_at``), or every ``every`` epochs from 0 up to ``until`` (default: all).
    ``restart``: a fresh cosine schedule per round (else one schedule over all epochs)."""

    epochs: int = 100
    generate_at: list[int] | None = None
    every: int = 5
    until: int | None = None
    expansion: float | None = None  # total synthetic = expansion x real training images
    total: int | None = None  # or a total count
    per_round: int | None = None  # or a count per generation round
    allocation: str = "frequency"  # frequency | even | inverse
    restart: bool = False


@dataclass
class SweepSpec:
    """The weight sweep (paper Figure 2) with the first seed's classifier; ``signals`` empty: no sweep. With
    ``choose``, each signal's mining weight is the one the paper's rule picks (``min_p_ratio``)."""

    signals: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    images_per_class: int = 8
    min_p_ratio: float = 0.5
    choose: bool = True


@dataclass
class IntrospectionSpec:
    """Longtail Introspection (paper 4.3, A.2) on the first seed's classifier. Runs when ``enabled`` or when
    the ``introspect`` condition asks for its prompts.

    ``captioner``: ``attribute`` (the embedded captioner for Fashion-MNIST-like images), ``vlm:<local
    transformers model directory>``, or ``openai:<model>`` (an OpenAI-compatible endpoint at ``llm_url``,
    key from the environment). ``embedder``: a local transformers encoder directory (default: MiniLM).
    ``llm_url``: an OpenAI-compatible chat endpoint that writes the prompts (default: the offline template).
    """

    enabled: bool = False
    images_per_class: int = 40  # guided and unguided images captioned per class (the paper: 100)
    keywords: int = 3  # K keywords per caption
    pairs: int = 10  # P (caption, keywords) pairs kept per class (the paper: 40)
    captioner: str = "attribute"
    embedder: str | None = None
    llm_url: str | None = None
    llm_model: str = "default"
    # keep only keywords at least this far (1 - cosine) from every baseline word. With the MiniLM embedder the
    # same word in another caption lies 0.00-0.07 away and a word absent from the baseline 0.44-0.82 (measured on
    # configs/compare.yaml), so 0.3 keeps the words only the guided captions need; 0 is the paper's pure form.
    min_distance: float = 0.0


@dataclass
class MineConfig:
    out: str = "runs/mine"
    data: DataSpec = field(default_factory=DataSpec)
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    base: BaseSpec = field(default_factory=BaseSpec)
    heads: HeadsSpec = field(default_factory=HeadsSpec)
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(weight=10.0))
    sweep: SweepSpec = field(default_factory=SweepSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    introspection: IntrospectionSpec = field(default_factory=IntrospectionSpec)
    conditions: list[str] = field(default_factory=lambda: ["ltg"])
    seeds: list[int] = field(default_factory=lambda: [0])
    trajectory: bool = False  # the A.7 trajectory analysis
    distances: bool = True  # FID / precision / recall of each condition's synthetic data vs real
    report: bool = True
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: leave torch's default)


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def load_demo_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                     top: dict | None = None) -> MineConfig:
    """The demo's config: ``configs/demo.yaml``, then ``path`` over it, then ``top`` (typed CLI flags,
    ``quick_overrides()``), then ``--set`` ``overrides``."""
    import yaml

    from ..config import load_config

    if path is None:
        return load_config(MineConfig, DEMO_CONFIG, overrides, top=top)
    return load_config(MineConfig, path, overrides, base=yaml.safe_load(DEMO_CONFIG.read_text()), top=top)


def quick_overrides() -> dict:
    """``longtail demo --quick``: one seed, fewer epochs, a smaller sweep and mining volume (a few minutes)."""
    return {
        "seeds": [0],
        "base": {"epochs": 12},
        "generator": {"num_steps": 12},
        "sweep": {"signals": ["entropy", "total"], "weights": [1.0], "images_per_class": 4},
        "schedule": {"epochs": 2, "generate_at": [0], "per_round": 100},
    }


# --- plan ---------------------------------------------------------------------------------------------------


def generation_epochs(s: ScheduleSpec) -> list[int]:
    """The epochs at which a round of synthetic data is generated (validated, sorted)."""
    if s.epochs < 1:
        raise ConfigError(f"schedule.epochs must be >= 1, got {s.epochs}")
    if s.generate_at is not None:
        epochs = sorted(set(int(e) for e in s.generate_at))
        if not epochs or epochs[0] < 0 or epochs[-1] >= s.epochs:
            raise ConfigError(f"schedule.generate_at must lie in [0, {s.epochs}), got {s.generate_at}")
        return epochs
    if s.every < 1:
        raise ConfigError(f"schedule.every must be >= 1, got {s.every}")
    until = s.epochs if s.until is None else min(s.until, s.epochs)
    return list(range(0, until, s.every))


def images_per_round(s: ScheduleSpec, real_total: int, rounds: int) -> int:
    given = [x is not None for x in (s.expansion, s.total, s.per_round)]
    if sum(given) != 1:
        raise ConfigError("set exactly one of schedule.expansion, schedule.total, schedule.per_round")
    if s.per_round is not None:
        return s.per_round
    total = s.total if s.total is not None else round(s.expansion * real_total)
    return math.ceil(total / rounds)


@dataclass
class Plan:
    """What a run will do: rounds with their epochs and per-class counts."""

    class_names: list[str]
    real_counts: list[int]
    rounds: list[dict]
    skipped: list[tuple[str, str]]

    def format(self) -> str:
        lines = [f"{len(self.class_names)} classes, {sum(self.real_counts)} real training images "
                 f"(per class {min(self.real_counts)}..{max(self.real_counts)})"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable images, e.g. {self.skipped[0][0]}")
        lines.append(f"{'round':>5}{'epoch':>7}{'fine-tune epochs':>18}{'images':>8}{'per class':>16}")
        for r in self.rounds:
            counts = r["counts"]
            lines.append(f"{r['round']:>5}{r['epoch']:>7}{r['finetune_epochs']:>18}{sum(counts):>8}"
                         f"{f'{min(counts)}..{max(counts)}':>16}")
        lines.append(f"total synthetic images: {sum(sum(r['counts']) for r in self.rounds)}")
        return "\n".join(lines)


def make_plan(cfg: MineConfig, source: DataSource, skipped: list | None = None) -> Plan:
    epochs = generation_epochs(cfg.schedule)
    counts = source.train_counts
    per_round = images_per_round(cfg.schedule, sum(counts), len(epochs))
    bounds = [*epochs, cfg.schedule.epochs]
    rounds = [{"round": i + 1, "epoch": e, "finetune_epochs": bounds[i + 1] - e,
               "counts": allocate(per_round, counts, cfg.schedule.allocation)} for i, e in enumerate(epochs)]
    return Plan(source.class_names, counts, rounds, skipped or [])


# --- set-up -------------------------------------------------------------------------------------------------


def check_config(cfg: MineConfig) -> list[Condition]:
    """Settings that cannot work, found before anything runs; returns the parsed conditions."""
    if cfg.data.source not in ("imagefolder", "fashion_mnist_lt"):
        raise ConfigError(f"data.source must be 'imagefolder' or 'fashion_mnist_lt', got {cfg.data.source!r}")
    if not cfg.seeds:
        raise ConfigError("seeds must list at least one seed")
    if cfg.base.epochs < 0 or cfg.heads.epochs < 0:
        raise ConfigError("base.epochs and heads.epochs must be >= 0")
    if cfg.base.epochs > 0 and cfg.classifier.checkpoint:
        raise ConfigError("base.epochs > 0 trains the classifier from scratch: drop classifier.checkpoint, or set "
                          "base.epochs: 0 to use the checkpoint as it is")
    check_captioner(cfg.introspection)
    try:
        return parse_conditions(list(cfg.conditions))
    except ValueError as err:
        raise ConfigError(f"conditions: {err}") from None


def check_paths(cfg: MineConfig) -> None:
    """Every local path the config names must exist; all missing ones are listed in one error."""
    missing = []
    if cfg.data.source == "imagefolder":
        missing += [f"data.{key} is required (an ImageFolder directory)" for key in ("train", "val")
                    if not getattr(cfg.data, key)]
    named = {"data.train": cfg.data.train, "data.val": cfg.data.val, "data.class_names": cfg.data.class_names,
             "data.data_dir": cfg.data.data_dir,
             "classifier.checkpoint": cfg.classifier.checkpoint, "classifier.heads": cfg.classifier.heads,
             "classifier.class_names": cfg.classifier.class_names, "generator.prompt_file": cfg.generator.prompt_file,
             "generator.guide_decoder": cfg.generator.guide_decoder}
    if cfg.generator.model and (cfg.generator.kind == "embedded" or cfg.generator.model.startswith(("/", ".", "~"))):
        named["generator.model"] = cfg.generator.model
    missing += [f"{key}: {path} does not exist" for key, path in named.items()
                if path and not Path(path).expanduser().exists()]
    if missing:
        raise ConfigError("the config names paths that are not there:\n  " + "\n  ".join(missing))


def preprocess_for(loaded: LoadedClassifier):
    """The training / evaluation input size and normalisation, from the classifier's bridge and first layer."""
    from ..data.imagefolder import Preprocess

    b = loaded.bridge
    size = b.size[0] if b.size else (b.resize if isinstance(b.resize, int) else None)
    base = loaded.model.base if isinstance(loaded.model, EpistemicClassifier) else loaded.model
    channels = b.in_channels or input_channels(base) or 3
    if size is None:
        raise ConfigError("the classifier's input size is unknown: set classifier.preprocess.size")
    mean = b.mean if len(b.mean) == channels else b.mean * channels
    std = b.std if len(b.std) == channels else b.std * channels
    # the classifier's own resize-then-crop ratio; no resize in its preprocessing means images arrive at size
    crop_pct = size / b.resize if isinstance(b.resize, int) else 1.0
    return Preprocess(size=int(size), mean=tuple(mean), std=tuple(std), channels=channels, crop_pct=crop_pct)


def class_names_for(cfg: MineConfig, loaded: LoadedClassifier | None) -> list[str] | None:
    from ..data.imagefolder import read_class_names

    if cfg.data.class_names:
        return read_class_names(cfg.data.class_names)
    return list(loaded.class_names) if loaded is not None and loaded.class_names else None


def make_source(cfg: MineConfig, loaded: LoadedClassifier) -> tuple[DataSource, list]:
    """The run's data source (and the unreadable images skipped, if allowed)."""
    from ..data.imagefolder import scan_imagefolder

    d = cfg.data
    if d.source == "fashion_mnist_lt":
        return FashionMNISTLT(d.data_dir, d.n_max, d.imbalance, d.data_seed, d.many, d.few), []
    train = scan_imagefolder(d.train, class_names_for(cfg, loaded), d.allow_corrupt)
    outputs = loaded.num_classes
    if outputs is not None and outputs != len(train.class_names):
        raise ConfigError(f"the classifier has {outputs} outputs but {d.train} has "
                          f"{len(train.class_names)} classes {train.class_names}")
    val = scan_imagefolder(d.val, train.class_names, d.allow_corrupt)
    return ImageFolderSource(train, val, preprocess_for(loaded), d.many, d.few), train.skipped + val.skipped


@dataclass
class Context:
    """What every stage shares: config, run directory, data, generator, accelerator, logging."""

    cfg: MineConfig
    run: Path
    source: DataSource
    acc: object
    log: Log
    show: bool
    ldm: object = None
    guide_decode: object = None

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process


# --- training and evaluation --------------------------------------------------------------------------------


def train_config(recipe: FinetuneSpec, lr: float | None = None, epochs: int = 1, seed: int = 0):
    from ..train import TrainConfig

    return TrainConfig(epochs=epochs, lr=recipe.lr if lr is None else lr, weight_decay=recipe.weight_decay,
                       batch_size=recipe.batch_size, rotation=recipe.rotation, translate=recipe.translate,
                       hflip=recipe.hflip, augment=recipe.augment, seed=seed)


def train_epochs(ctx: Context, model: nn.Module, recipe: FinetuneSpec, *, seed: int, first: int, last: int,
                 total: int, rows=(), store_root: Path | None = None, lr: float | None = None,
                 desc: str = "train") -> list[float]:
    """Epochs ``[first, last)`` of a cosine schedule over ``total`` on real (+ synthetic) data."""
    from ..train import fit, tensor_augment

    loader = ctx.source.train_loader(recipe, seed, rows, store_root)
    tc = train_config(recipe, lr, total, seed)
    return fit(model, loader, tc, accelerator=ctx.acc, first_epoch=first, last_epoch=last, total_epochs=total,
               num_classes=len(ctx.source.class_names), desc=desc, show=ctx.show,
               batch_transform=tensor_augment(tc) if ctx.source.batch_augment else None)


def evaluate(ctx: Context, model: nn.Module, detection: bool = False, scores_path: Path | None = None) -> dict:
    """Accuracy on the evaluation split (top-1, per class, Many / Medium / Few); with ``detection`` also the
    signals' AUROC for rare and hard examples, and (``scores_path``) every example's signals for ROC curves."""
    from safetensors.torch import save_file

    from ..train import predict_loader

    out, labels = predict_loader(model, ctx.source.eval_loader(), ctx.acc)
    preds = out.logits.argmax(-1)
    groups = ctx.source.groups
    report = accuracy_report(preds, labels, groups)
    if detection or out.head_logits is not None:
        report["detection"] = detection_report(out, labels, groups)
    if scores_path is not None and ctx.is_main:
        tensors = {f"signal/{k}": v.contiguous() for k, v in signal_scores(out).items()}
        tensors.update(labels=labels.contiguous(), preds=preds.contiguous(),
                       rare=torch.tensor([groups[int(y)] == "few" for y in labels]))
        save_file(tensors, str(scores_path))
    return report


# --- stage: base classifier (+ Epistemic Head) --------------------------------------------------------------


def _base_dir(run: Path, seed: int) -> Path:
    return run / f"seed_{seed}" / "base"


def load_base(ctx: Context, seed: int) -> LoadedClassifier:
    """The seed's base classifier as the base stage left it (its ``classifier.json``)."""
    return load_classifier_spec(ClassifierSpec(spec=str(_base_dir(ctx.run, seed) / "classifier.json")), ctx.acc.device)


def stage_base(ctx: Context, seed: int) -> tuple[LoadedClassifier, dict]:
    """Train (or take) the seed's classifier, attach and train an Epistemic Head if asked, evaluate."""
    cfg, base_dir = ctx.cfg, _base_dir(ctx.run, seed)
    metrics_path = base_dir / "metrics.json"
    if metrics_path.is_file() and (base_dir / "classifier.json").is_file():
        return load_base(ctx, seed), read_json(metrics_path)
    started = time.perf_counter()
    cs = cfg.classifier
    torch.manual_seed(seed)
    spec = replace(cs, heads=None) if cfg.base.epochs > 0 else cs
    loaded = load_classifier_spec(spec, ctx.acc.device)
    base_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cs.checkpoint and str(Path(cs.checkpoint).resolve())
    if cfg.base.epochs > 0:
        n = cfg.base.epochs
        train_epochs(ctx, loaded.model, cfg.base, seed=seed, first=0, last=n, total=n,
                     desc=f"base classifier (seed {seed})")
        checkpoint = "classifier.safetensors"
        if ctx.is_main:
            save_state(loaded.model, base_dir / checkpoint)
    heads = cs.heads and str(Path(cs.heads).resolve())
    if cfg.heads.epochs > 0 and not isinstance(loaded.model, EpistemicClassifier):
        loaded.model = attach_heads(ctx, loaded.model, seed)
        heads = "heads.safetensors"
        if ctx.is_main:
            loaded.model.save_heads(base_dir / heads)
    num_heads = loaded.model.heads.num_heads if isinstance(loaded.model, EpistemicClassifier) else None
    metrics = {**evaluate(ctx, loaded.model, detection=True, scores_path=base_dir / "test_scores.safetensors"),
               "seconds": time.perf_counter() - started}
    if cfg.base.ensemble > 0 and "detection" in metrics:
        metrics["detection"].update(ensemble_detection(ctx, seed))
    if ctx.is_main:
        write_classifier_json(base_dir, cs.spec, checkpoint, model_kwargs=cs.model_kwargs,
                              num_classes=len(ctx.source.class_names), class_names=ctx.source.class_names,
                              preprocess=cs.preprocess, heads=heads, num_heads=num_heads, head_name=cs.head_name)
        write_json(metrics_path, metrics)
    ctx.acc.wait_for_everyone()
    ctx.log(f"seed {seed}: base classifier top-1 {metrics['top1']:.3f} (many {metrics['many']:.3f}, "
            f"medium {metrics['medium']:.3f}, few {metrics['few']:.3f})")
    return loaded, metrics


def attach_heads(ctx: Context, model: nn.Module, seed: int) -> EpistemicClassifier:
    """K copies of the trained head (+ noise), trained with the oracle loss while the base stays frozen."""
    hs = ctx.cfg.heads
    wrapped = EpistemicClassifier(model, num_heads=hs.num_heads, head_name=ctx.cfg.classifier.head_name,
                                  init_noise=hs.init_noise, seed=seed)
    ctx.log(f"training an Epistemic Head ({hs.num_heads} heads) for {hs.epochs} epochs (seed {seed})")
    train_epochs(ctx, HeadsOnly(wrapped), ctx.cfg.finetune, seed=seed, first=0, last=hs.epochs, total=hs.epochs,
                 lr=hs.lr, desc=f"epistemic head (seed {seed})")
    return wrapped


def ensemble_detection(ctx: Context, seed: int) -> dict[str, dict[str, float]]:
    """Detection by independently trained classifiers (their logits stacked as K "heads"; paper Figure 5)."""
    from ..train import predict_loader

    cfg, logits, labels = ctx.cfg, [], None
    for k in range(cfg.base.ensemble):
        member_seed = 1000 * (seed + 1) + k
        torch.manual_seed(member_seed)
        member = load_classifier_spec(replace(cfg.classifier, heads=None), ctx.acc.device).model
        n = cfg.base.epochs
        train_epochs(ctx, member, cfg.base, seed=member_seed, first=0, last=n, total=n,
                     desc=f"ensemble member {k} (seed {seed})")
        out, labels = predict_loader(member, ctx.source.eval_loader(), ctx.acc)
        logits.append(out.logits)
    stacked = torch.stack(logits, dim=1)  # [N, K, C]
    out = ClassifierOutput(logits=stacked.mean(dim=1), head_logits=stacked)
    report = detection_report(out, labels, ctx.source.groups, names=["total", "aleatoric", "epistemic"])
    return {f"ensemble_{name}": values for name, values in report.items()}


# --- stage: sweep -------------------------------------------------------------------------------------------


def _class_jobs(ctx: Context, per_class: int, base_seed: int, prompt=None) -> list:
    from ..generate import plan_jobs
    from ..prompts import job_prompts, prompt_table

    names = ctx.source.class_names
    if prompt is None:
        prompt = job_prompts(prompt_table(names, ctx.cfg.generator.prompt_template, ctx.cfg.generator.prompt_file))
    return plan_jobs([per_class] * len(names), prompt, base_seed=base_seed)


def _generate(ctx: Context, jobs, classifier, guidance: GuidanceConfig | None, desc: str):
    from ..generate import generate

    gs = ctx.cfg.generator
    return generate(ctx.ldm, jobs, classifier=classifier, guidance=guidance, num_steps=gs.num_steps,
                    cfg_scale=gs.cfg_scale, negative_prompt=gs.negative_prompt, batch_size=gs.batch_size,
                    guide_decode=ctx.guide_decode, show=ctx.show, desc=desc)


def stage_sweep(ctx: Context, loaded: LoadedClassifier) -> dict | None:
    """Signal and P(class) against the weight with the first seed's classifier; the paper's rule per signal."""
    from ..calibrate import calibrate

    sw = ctx.cfg.sweep
    if not sw.signals:
        return None
    path = ctx.run / "sweep" / "sweep.json"
    if path.is_file():
        return read_json(path)
    jobs = _class_jobs(ctx, sw.images_per_class, 10_000)
    classifier = bridged_classifier(loaded)

    def generate_fn(guidance: GuidanceConfig | None):
        desc = f"sweep {guidance.signal} w={guidance.weight:g}" if guidance else "sweep unguided"
        return _generate(ctx, jobs, classifier, guidance, desc)

    result = calibrate(generate_fn, torch.tensor([j.class_id for j in jobs]), sw.signals, sw.weights,
                       ctx.run / "sweep", base=replace(ctx.cfg.guidance, weight=0.0), min_p_ratio=sw.min_p_ratio,
                       per_class_in_grid=min(2, sw.images_per_class), log=ctx.log)
    if ctx.is_main:
        write_json(path, result)
    return result


def weight_of(cfg: MineConfig, sweep: dict | None) -> Callable[[str], float]:
    """A signal's mining weight: the sweep's choice (``sweep.choose``; the smallest swept weight when the rule
    passed none), else ``guidance.weight``."""

    def weight(signal: str) -> float:
        if sweep is None or not cfg.sweep.choose:
            return cfg.guidance.weight
        choice = sweep["choices"].get(signal)
        if choice is None:
            raise ConfigError(f"signal {signal!r} was not swept; add it to sweep.signals or set sweep.choose: false")
        if choice["weight"] is None:
            return min(w for w in cfg.sweep.weights if w > 0)
        return float(choice["weight"])

    return weight


# --- stage: introspection -----------------------------------------------------------------------------------


def check_captioner(ic: IntrospectionSpec) -> tuple[str, str]:
    """``(kind, argument)`` of ``introspection.captioner``; a ConfigError naming the setting otherwise."""
    kind, _, arg = ic.captioner.partition(":")
    if (kind == "attribute" and not arg) or (kind in ("vlm", "openai") and arg):
        if kind == "openai" and not ic.llm_url:
            raise ConfigError("introspection.captioner=openai:<model> needs introspection.llm_url (the endpoint)")
        return kind, arg
    raise ConfigError("introspection.captioner must be 'attribute', 'vlm:<local model dir>' or 'openai:<model>', "
                      f"got {ic.captioner!r}")


def make_captioner(ic: IntrospectionSpec):
    """The configured captioner: the attribute captioner, a local transformers VLM, or an OpenAI-compatible
    vision endpoint (key from the environment)."""
    from ..introspection import AttributeCaptioner, OpenAIVisionCaptioner, TransformersCaptioner

    kind, arg = check_captioner(ic)
    if kind == "vlm":
        return TransformersCaptioner(arg)
    if kind == "openai":
        return OpenAIVisionCaptioner(ic.llm_url, arg)
    return AttributeCaptioner()


def stage_introspection(ctx: Context, loaded: LoadedClassifier, guidance: GuidanceConfig) -> dict[str, list[str]]:
    """Caption guided vs unguided images per class, mine longtail keywords, turn them into prompts.

    Writes ``introspection/{keywords,class_keywords,captions,prompts}.json`` and example pairs per class;
    returns the refined prompts per class name. Resumes from ``prompts.json``.
    """
    from ..calibrate import save_grid
    from ..introspection import (
        TransformersTokenEmbedder,
        class_keywords,
        make_chat_fn,
        mine_keywords,
        refine_prompts,
    )
    from ..introspection import save_prompts as write_prompts
    from ..introspection.prompts import prompt_texts
    from ..prompts import class_prompts

    out = ctx.run / "introspection"
    if (out / "prompts.json").is_file():
        return read_json(out / "prompts.json")
    ic, names, gs = ctx.cfg.introspection, ctx.source.class_names, ctx.cfg.generator
    fallback = class_prompts(names, gs.prompt_template, gs.prompt_file)
    jobs = _class_jobs(ctx, ic.images_per_class, 30_000)
    classifier = bridged_classifier(loaded)
    guided = _generate(ctx, jobs, classifier, guidance, "introspection: guided")
    plain = _generate(ctx, jobs, classifier, None, "introspection: unguided")
    job_names = [names[j.class_id] for j in jobs]
    captioner = make_captioner(ic)
    guided_caps, plain_caps = captioner.caption(guided.images, job_names), captioner.caption(plain.images, job_names)
    embedder = TransformersTokenEmbedder(ic.embedder) if ic.embedder else TransformersTokenEmbedder()
    backend = make_chat_fn(ic.llm_url, ic.llm_model) if ic.llm_url else "template"
    keywords, stats, prompts, errors = {}, {}, {}, {}
    for c, name in enumerate(names):
        idx = [i for i, j in enumerate(jobs) if j.class_id == c]
        pairs = mine_keywords([guided_caps[i] for i in idx], [plain_caps[i] for i in idx], name, embedder,
                              k=ic.keywords, pairs=ic.pairs, min_distance=ic.min_distance)
        keywords[name] = [p.to_dict() for p in pairs]
        stats[name] = [{"word": k.word, "count": k.count, "mean_distance": k.mean_distance}
                       for k in class_keywords(pairs)]
        refined = refine_prompts(pairs, name, backend=backend)
        prompts[name] = prompt_texts(refined, unique=True) or [fallback[c]]
        errors[name] = [r.error for r in refined if r.error]
        top = ", ".join(f"{k['word']} ({k['count']})" for k in stats[name][:4])
        ctx.log(f"  {name:<11} keywords: {top or '-'}; e.g. {prompts[name][0]!r}")
        n = min(4, len(idx))
        if ctx.is_main and n:
            save_grid({0.0: plain.images[idx[:n]], 1.0: guided.images[idx[:n]]}, torch.zeros(n, dtype=torch.long),
                      out / "examples" / f"{name.replace(' ', '_')}.png", per_class=n)
    if ctx.is_main:
        write_json(out / "keywords.json", keywords)
        write_json(out / "class_keywords.json", stats)
        write_json(out / "captions.json", {"guided": guided_caps, "unguided": plain_caps,
                                           "classes": [j.class_id for j in jobs]})
        if any(errors.values()):
            write_json(out / "errors.json", errors)
        write_prompts(out / "prompts.json", prompts)
    ctx.acc.wait_for_everyone()
    return prompts


# --- stage: mining ------------------------------------------------------------------------------------------


def _prompt_fn(ctx: Context, cond: Condition, intro_prompts: dict[str, list[str]] | None):
    from ..generate import gif_prompts
    from ..prompts import job_prompts, prompt_table

    names = ctx.source.class_names
    if cond.kind == "gif":
        table = [gif_prompts(n) for n in names]
    elif cond.kind == "introspect":
        if not intro_prompts:
            raise ConfigError("the introspect condition needs the introspection stage's prompts")
        table = [intro_prompts[n] for n in names]
    else:
        return job_prompts(prompt_table(names, ctx.cfg.generator.prompt_template, ctx.cfg.generator.prompt_file))

    def prompt(c: int, i: int) -> str:
        return table[c][i % len(table[c])]

    return prompt


def stage_mining(ctx: Context, seed: int, cond: Condition, guidance: GuidanceConfig | None, plan: Plan,
                 intro_prompts: dict[str, list[str]] | None) -> list[dict]:
    """One condition for one seed, from the seed's base classifier (resumable): generate, fine-tune, evaluate."""
    from ..generate import generate_dataset, plan_jobs

    cfg, acc = ctx.cfg, ctx.acc
    run_dir = ctx.run / f"seed_{seed}" / "mining" / cond.dirname
    loaded = load_base(ctx, seed)
    model, classifier = loaded.model, bridged_classifier(loaded)
    if guidance is not None:
        check_guidance(guidance, loaded)
    gs, prompt = cfg.generator, _prompt_fn(ctx, cond, intro_prompts)
    meta = {"weight": guidance.weight if guidance else 0.0, "model": f"{gs.kind}:{gs.model or 'shipped'}",
            "num_steps": gs.num_steps, "cfg_scale": gs.cfg_scale}

    def synthesize(r: int, m: nn.Module, counts: list[int], store: SyntheticStore) -> None:
        jobs = plan_jobs(counts, prompt, base_seed=seed, start=[(r - 1) * n for n in counts])
        generate_dataset(ctx.ldm, jobs, store.root, ctx.source.class_names, meta={**meta, "round": r},
                         prefix=f"r{r}_", process_index=acc.process_index, num_processes=acc.num_processes,
                         chunk=gs.batch_size * 4, show=ctx.show and ctx.is_main, classifier=classifier,
                         guidance=guidance, num_steps=gs.num_steps, cfg_scale=gs.cfg_scale,
                         negative_prompt=gs.negative_prompt, batch_size=gs.batch_size, guide_decode=ctx.guide_decode,
                         record_signal=(guidance or cfg.guidance).signal, desc=f"{cond.text} r{r} (seed {seed})")
        acc.wait_for_everyone()
        if ctx.is_main:
            store.merge()
        acc.wait_for_everyone()

    bounds = [r["epoch"] for r in plan.rounds] + [cfg.schedule.epochs]
    recipe = replace(cfg.finetune, augment=cond.augment) if cond.kind == "aug" else cfg.finetune

    def finetune(m: nn.Module, rows: list[dict[str, str]], r: int) -> list[float]:
        first, last = bounds[r - 1], bounds[r]
        if cfg.schedule.restart:
            first, last, total = 0, last - first, last - first
        else:
            total = cfg.schedule.epochs
        return train_epochs(ctx, m, recipe, seed=seed * 1000 + r, first=first, last=last, total=total, rows=rows,
                            store_root=run_dir / "synthetic", desc=f"fine-tune {cond.text} r{r} (seed {seed})")

    mcfg = MiningConfig(rounds=len(plan.rounds), images_per_round=sum(plan.rounds[0]["counts"]),
                        allocation=cfg.schedule.allocation)
    history = mine(model, synthesize if cond.synthetic else None, finetune, lambda m: evaluate(ctx, m), mcfg,
                   plan.real_counts, run_dir, is_main=ctx.is_main, barrier=acc.wait_for_everyone)
    final = history[-1]
    ctx.log(f"seed {seed} {cond.text:9s}: top-1 {final['top1']:.3f}  few {final['few']:.3f}")
    return history


# --- stages: trajectory, distances --------------------------------------------------------------------------


def stage_trajectory(ctx: Context, loaded: LoadedClassifier, guidance: GuidanceConfig) -> dict:
    """A.7: FID of decoded predicted-clean vs decoded noisy latents along the steps; signal at w=0 vs w."""
    from ..evaluation.features import LayerFeatures, extract
    from ..evaluation.trajectory import format_trajectory, trajectory_analysis
    from ..sampling import initial_latents

    path = ctx.run / "trajectory.json"
    if path.is_file():
        return read_json(path)
    jobs = _class_jobs(ctx, max(2, ctx.cfg.sweep.images_per_class), 20_000)
    features = LayerFeatures(loaded.model)
    real = extract(features, ctx.source.eval_inputs(2000)[0])
    ldm, gs = ctx.ldm, ctx.cfg.generator
    cond = ldm.encode_prompts([j.prompt for j in jobs])
    uncond = ldm.encode_prompts([gs.negative_prompt] * len(jobs))
    latents = initial_latents([j.seed for j in jobs], ldm.latent_shape)
    rows = trajectory_analysis(ldm.denoise, ldm.scheduler, ldm.decode, cond, latents, features, real,
                               bridged_classifier(loaded), guidance, uncond=uncond, cfg_scale=gs.cfg_scale,
                               num_steps=gs.num_steps)
    result = {"signal": guidance.signal, "weight": guidance.weight, "images": len(jobs), "rows": rows}
    if ctx.is_main:
        write_json(path, result)
    ctx.log(format_trajectory(rows, guidance.weight))
    return result


def stage_distances(ctx: Context, conditions: list[Condition]) -> dict:
    """FID / precision / recall of each condition's synthetic images vs the real evaluation images (per seed),
    on the seed's base-classifier features (the input of its head)."""
    from ..evaluation.distribution import distribution_report
    from ..evaluation.features import LayerFeatures, extract

    path = ctx.run / "distribution.json"
    if path.is_file():
        return read_json(path)
    result: dict[str, dict] = {"features": "base classifier, input of its head", "conditions": {}}
    real_x, real_y = ctx.source.eval_inputs()
    for seed in ctx.cfg.seeds:
        try:
            features = LayerFeatures(load_base(ctx, seed).model)
        except ValueError as err:  # no head found: say so, and leave the other stages' results alone
            ctx.log(f"distances skipped: {err}")
            return {"skipped": str(err), "summary": {}}
        real = extract(features, real_x)
        for cond in conditions:
            store = ctx.run / f"seed_{seed}" / "mining" / cond.dirname / "synthetic"
            if not (store / "manifest.csv").is_file():
                continue
            fake_x, fake_y = ctx.source.synthetic_inputs(store)
            report = distribution_report(real, real_y, extract(features, fake_x), fake_y, ctx.source.class_names)
            result["conditions"].setdefault(cond.text, {})[str(seed)] = report
    result["summary"] = {
        cond: {key: mean_std([r["overall"][key] for r in per_seed.values()]) for key in ("fid", "precision", "recall")}
        for cond, per_seed in result["conditions"].items()
    }
    if ctx.is_main:
        write_json(path, result)
    return result


# --- summary ------------------------------------------------------------------------------------------------


def summarize(ctx: Context, base: dict[int, dict], mining: dict[int, dict[str, list[dict]]],
              conditions: list[Condition], guidance_of: dict[str, dict], sweep: dict | None) -> dict:
    seeds = ctx.cfg.seeds
    table = {c.text: {k: mean_std([mining[s][c.text][-1][k] for s in seeds]) for k in METRICS} for c in conditions}
    detection = {}
    first = base[seeds[0]].get("detection", {})
    for name in first:
        detection[name] = {k: mean_std([base[s]["detection"][name][k] for s in seeds])
                           for k in ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")}
    ltg = next((g for c, g in guidance_of.items() if c == "ltg"), None) or next(iter(guidance_of.values()), None)
    return {
        "seeds": seeds,
        "evaluated_on": ctx.source.eval_name,
        "class_names": ctx.source.class_names,
        "train_counts": ctx.source.train_counts,
        "groups": ctx.source.groups,
        "base": {k: mean_std([base[s][k] for s in seeds]) for k in METRICS},
        "detection": detection,
        "sweep": sweep,
        "ltg": ltg,
        "condition_guidance": guidance_of,
        "conditions": table,
        "per_seed": {str(s): {"base": base[s], "mining": mining[s]} for s in seeds},
    }


def format_summary(summary: dict) -> str:
    """The printed table: accuracy per condition (mean ± std over seeds), detection AUROCs, timing."""
    from ..conditions import condition_label

    labels = ("top-1", "many", "medium", "few")
    lines = [f"{summary.get('evaluated_on', 'evaluation split')}; mean ± std over seeds {summary['seeds']}", ""]
    lines.append(f"{'condition':<26}" + "".join(f"{k:>14}" for k in labels))
    lines.append(f"{'base (LT real only)':<26}" + "".join(mean_std_cell(summary["base"][k]) for k in METRICS))
    guidance = summary.get("condition_guidance", {})
    for cond, m in summary["conditions"].items():
        lines.append(f"{condition_label(cond, guidance.get(cond)):<26}" + "".join(mean_std_cell(m[k]) for k in METRICS))
    if summary.get("detection"):
        keys = ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")
        lines += ["", f"{'signal':<20}" + "".join(f"{k:>14}" for k in ("AUROC rare", "AUROC hard", "acc > q90",
                                                                         "acc < q90"))]
        for name, d in summary["detection"].items():
            lines.append(f"{name:<20}" + "".join(mean_std_cell(d[k]) for k in keys))
    if summary.get("distribution"):
        lines += ["", f"{'synthetic vs real':<26}" + "".join(f"{k:>14}" for k in ("FID", "precision", "recall"))]
        for cond, d in summary["distribution"].items():
            label = condition_label(cond, guidance.get(cond))
            lines.append(f"{label:<26}" + "".join(mean_std_cell(d[k]) for k in ("fid", "precision", "recall")))
    timing = (summary.get("sweep") or {}).get("timing")
    if timing:
        lines += ["", f"generation: unguided {timing['unguided_img_per_s']:.1f} img/s, guided "
                  f"{timing['guided_img_per_s']:.1f} img/s ({timing['slowdown']:.1f}x slower)"]
    return "\n".join(lines)


# --- the job ------------------------------------------------------------------------------------------------


def _accelerator(cfg: MineConfig):
    from accelerate import Accelerator, DataLoaderConfiguration

    # split_batches: each global batch is divided over the processes, so the optimisation is the same as on one
    # device up to floating-point order (BatchNorm statistics aside, which are per process)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))


def _load_generator(cfg: MineConfig, device: torch.device, log: Log):
    if cfg.generator.kind == "embedded":
        from ..models.tiny import ASSETS_DIR, TinyGeneratorConfig, train_generator

        root = Path(cfg.generator.model) if cfg.generator.model else ASSETS_DIR
        if not (root / "longtail_generator.json").is_file():
            log(f"no generator at {root}: training one on full Fashion-MNIST (about an hour on 2 cores)")
            train_generator(root, TinyGeneratorConfig(), data_dir=cfg.data.data_dir, log=log)
    ldm, guide, _ = load_generator(cfg.generator, device)
    return ldm, guide


def _set_up(cfg: MineConfig, show: bool, log: Log):
    """Checks, the data source, the plan and the generator: what every entry point needs first."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    conditions = check_config(cfg)
    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    check_paths(cfg)
    acc = _accelerator(cfg)
    spec_loaded = load_classifier_spec(replace(cfg.classifier, heads=None) if cfg.base.epochs else cfg.classifier,
                                       acc.device)
    source, skipped = make_source(cfg, spec_loaded)
    plan = make_plan(cfg, source, skipped)
    log(plan.format())
    ctx = Context(cfg, Path(cfg.out), source, acc, log, show)
    ctx.ldm, ctx.guide_decode = _load_generator(cfg, acc.device, log)
    return cfg, conditions, ctx, spec_loaded, plan


def run_introspect(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), show: bool = True,
                   log: Log = print) -> dict[str, list[str]]:
    """Longtail Introspection on a finished (or at least base-trained) run: its config, its first seed's
    classifier, its calibrated weight. ``overrides`` (``introspection.*``) set the captioner, embedder, LLM.
    Returns the refined prompts per class (also in ``<run>/introspection/prompts.json``)."""
    from ..config import load_config

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory: config.yaml is missing")
    cfg = load_config(MineConfig, run / "config.yaml", [*overrides, f"out={run}"])
    check_captioner(cfg.introspection)
    cfg, _, ctx, _, _ = _set_up(cfg, show, log)
    seed = cfg.seeds[0]
    if not (_base_dir(run, seed) / "classifier.json").is_file():
        raise ConfigError(f"{run}: the base stage has not run (seed_{seed}/base/classifier.json is missing); run "
                          "`longtail mine` on this config first")
    weight = weight_of(cfg, read_json(run / "sweep" / "sweep.json"))
    guidance = replace(cfg.guidance, weight=weight(cfg.guidance.signal))
    return stage_introspection(ctx, load_base(ctx, seed), guidance)


def run_mine(cfg: MineConfig, dry_run: bool = False, show: bool = True, log: Log = print) -> dict:
    """Validate, plan and (unless ``dry_run``) run or resume every stage. Returns the summary (also written to
    ``<out>/metrics.json``), or with ``dry_run`` the plan and a generation-time estimate."""
    cfg, conditions, ctx, spec_loaded, plan = _set_up(cfg, show, log)
    run, source, skipped = ctx.run, ctx.source, plan.skipped
    if dry_run:
        return {"plan": plan.__dict__, "estimate": estimate(ctx, spec_loaded, plan)}
    started = time.perf_counter()
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "config.yaml")
        write_json(run / "plan.json", plan.__dict__)
        write_json(run / "class_names.json", source.class_names)
        if skipped:
            write_json(run / "skipped_images.json", skipped)
    log(f"real training data: {source.describe()}")
    base, models = {}, {}
    for seed in cfg.seeds:
        models[seed], base[seed] = stage_base(ctx, seed)
    first = models[cfg.seeds[0]]
    sweep = stage_sweep(ctx, first)
    weight = weight_of(cfg, sweep)
    guidance_of = {c.text: {"signal": g.signal, "weight": g.weight} for c in conditions
                   if (g := c.guidance(cfg.guidance, weight)) is not None}
    main_guidance = replace(cfg.guidance, weight=weight(cfg.guidance.signal))
    prompts = None
    if cfg.introspection.enabled or any(c.kind == "introspect" for c in conditions):
        log("longtail introspection (keywords of guided vs unguided captions):")
        prompts = stage_introspection(ctx, first, main_guidance)
    mining: dict[int, dict[str, list[dict]]] = {}
    for seed in cfg.seeds:
        mining[seed] = {}
        for cond in conditions:
            guidance = active(g) if (g := cond.guidance(cfg.guidance, weight)) is not None else None
            mining[seed][cond.text] = stage_mining(ctx, seed, cond, guidance, plan, prompts)
    summary = summarize(ctx, base, mining, conditions, guidance_of, sweep)
    if cfg.trajectory:
        summary["trajectory"] = stage_trajectory(ctx, first, main_guidance)
    if cfg.distances and any(c.synthetic for c in conditions):
        summary["distribution"] = stage_distances(ctx, conditions)["summary"] or None
    summary["seconds"] = time.perf_counter() - started
    table = format_summary(summary)
    if ctx.is_main:
        write_json(run / "metrics.json", summary)
        (run / "summary.txt").write_text(table + "\n")
    log(table)
    if cfg.report and ctx.is_main:
        from ..report import write_report

        log(f"report: {write_report(run)}")
    return read_json(run / "metrics.json") if ctx.is_main else summary


def estimate(ctx: Context, loaded: LoadedClassifier, plan: Plan) -> dict:
    """Time a short guided warm-up (one batch of up to 8 images, 2 steps) and scale it to the plan's steps,
    images, conditions and seeds. Batches larger than 8 are usually faster per image, so it errs high."""
    from ..generate import generate, plan_jobs
    from ..prompts import job_prompts, prompt_table
    from ..signals import get_signal

    gs = ctx.cfg.generator
    guidance = active(ctx.cfg.guidance)
    if guidance is not None and get_signal(guidance.signal).needs_heads and not isinstance(
            loaded.model, EpistemicClassifier):
        if ctx.cfg.heads.epochs <= 0:
            check_guidance(guidance, loaded)
        guidance = None  # the run trains the heads first; time the warm-up without them
    n = max(1, min(gs.batch_size, 8))
    table = prompt_table(ctx.source.class_names, gs.prompt_template, gs.prompt_file)
    jobs = plan_jobs([n] + [0] * (len(table) - 1), job_prompts(table))
    classifier = bridged_classifier(loaded)
    kw = dict(classifier=classifier, guidance=guidance, cfg_scale=gs.cfg_scale, show=False)
    generate(ctx.ldm, jobs[:1], num_steps=1, batch_size=1, **kw)  # first-call overheads
    started = time.perf_counter()
    generate(ctx.ldm, jobs, num_steps=2, batch_size=n, guide_decode=ctx.guide_decode, **kw)
    per_image = (time.perf_counter() - started) / len(jobs) * gs.num_steps / 2
    total = sum(sum(r["counts"]) for r in plan.rounds)
    runs = len(ctx.cfg.seeds) * sum(c.synthetic for c in parse_conditions(ctx.cfg.conditions))
    hours = per_image * total * runs / 3600
    ctx.log(f"estimated generation time: {per_image:.2f} s/image, {hours:.2f} h for all rounds, conditions and "
            f"seeds (from a warm-up of {len(jobs)} images x 2 steps, scaled to {gs.num_steps} steps)")
    return {"seconds_per_image": per_image, "total_hours": hours, "warmup_images": len(jobs), "warmup_steps": 2,
            "images": total}
