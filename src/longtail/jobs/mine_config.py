"""What a mining run is: its config sections (one dataclass per concern), the demo's config, the plan of
generation rounds, and the checks that run before anything else."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..conditions import Condition, parse_conditions
from ..config import ConfigError
from ..data.sources import DataSource, Recipe
from ..mining import allocate
from ..sampling import GuidanceConfig
from .common import ClassifierSpec, GeneratorSpec
from .generator_check import GeneratorCheckSpec
from .tracking import check_track

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
    eval_split: str = "test"  # fashion_mnist_lt: test | val (unused training images, to choose settings on)
    val_per_class: int = 500
    nuisance: dict[str, float] | None = None  # fashion_mnist_lt: rare modes inside classes (longtail.data.nuisance)
    nuisance_eval: list[str] = field(default_factory=list)  # extra evaluation splits: a mode on every image
    many: int = 100
    few: int = 20


@dataclass
class FinetuneSpec(Recipe):
    """The fine-tuning recipe (paper A.1: Adam, cosine LR, rotation, crops, flips) and its data feed.

    ``loss``: ``ce``, ``logit_adjusted`` (Menon et al. 2021, the loss LiVT fine-tunes with; ``tau``) or
    ``balanced_softmax`` (Ren et al. 2020); the class prior is that of the real + synthetic training images.
    ``sampling`` (``uniform`` | ``class_balanced``) is the loader's; do not combine class-balanced sampling with a
    prior-compensating loss (the imbalance would be corrected twice).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "ce"
    tau: float = 1.0


@dataclass
class BaseSpec(FinetuneSpec):
    """The base classifier. ``epochs`` 0: the classifier as given; > 0: train ``classifier.spec``'s
    architecture from scratch on the real data, once per seed. ``ensemble`` > 0 also trains that many
    independent classifiers for the detection comparison (paper Figure 5)."""

    epochs: int = 0
    ensemble: int = 0


@dataclass
class HeadsSpec:
    """The Epistemic Head: ``epochs`` > 0 attaches ``num_heads`` heads to a classifier that has none and trains
    only them (base frozen). ``init``: ``copy`` (the trained head + ``init_noise`` x std noise) or ``fresh``.
    Loss (``longtail.heads.HeadLoss``): relaxed winner-takes-all, the losing heads sharing ``epsilon`` (0: the
    paper's oracle loss; 1 - 1/num_heads: the plain mean), annealed linearly to ``epsilon_end`` if set;
    ``bootstrap``: each head on its own Poisson(1) resample. Bootstrap + the plain mean is bagging of the last
    layer, the default: chosen on the validation split and confirmed, pre-registered, on the test split with 5
    fresh seeds (benchmarks/heads_variants.py, benchmarks/preregistration.md): epistemic AUROC for rare images
    0.924 vs 0.789 with the paper's oracle loss (``epsilon: 0, bootstrap: false``, still one setting away).
    ``epsilon: 0.8`` is the plain mean for the default 5 heads (1 - 1/K)."""

    num_heads: int = 5
    epochs: int = 0
    init_noise: float = 0.1
    lr: float = 1e-3
    init: str = "copy"
    epsilon: float = 0.8
    epsilon_end: float | None = None
    bootstrap: bool = True


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
    # guidance options (longtail.guidance.GuidanceConfig.with_options) compared at the chosen weight of the guidance
    # signal (or of the first swept signal when it is not swept), e.g. [{views: 4}, {lowpass: 1.0}]: a row each in sweep.json and a column each in grid_options.png
    options: list[dict] = field(default_factory=list)


@dataclass
class JudgeSpec:
    """A judge: a classifier that is not the guided one, to tell "hard" from "broken" (its accuracy and
    P(class) on generated images, and its features for realism). ``spec``: ``None`` (no judge), ``train`` (the
    embedded default: a SmallCNN trained once on the full balanced Fashion-MNIST training set, the generator's
    data, ``epochs`` epochs, kept in ``<run>/judge/``), ``shipped`` (that judge, trained once and shipped for
    each shipped embedded generator, copied into ``<run>/judge/``), a directory with a ``classifier.json``, or
    ``clip:<local CLIP directory>`` (zero-shot with the class prompts). ``min_ratio``: the weight rule also needs
    judge accuracy >= ``min_ratio`` x unguided's (None: the paper's rule alone). ``real_per_class``: real
    evaluation images per class for the judge's precision / recall."""

    spec: str | None = None
    epochs: int = 3
    min_ratio: float | None = None
    real_per_class: int = 100


@dataclass
class EfficiencySpec:
    """The data-efficiency curve (issue "Hard, real and worth it"): per seed, condition and size n in ``sizes``,
    one round of n synthetic images per class generated with the seed's base classifier at epoch 0, then
    ``epochs`` fine-tuning epochs (0: ``schedule.epochs``) with the run's recipe. ``conditions``: synthetic
    conditions of the run (empty: all of them). Sets are nested: the n images of a condition are its first n
    jobs per class (the same seeds), so a smaller set is copied out of the largest and only the count differs
    along the curve. ``sizes`` empty: no curve."""

    sizes: list[int] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)
    epochs: int = 0


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
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    efficiency: EfficiencySpec = field(default_factory=EfficiencySpec)
    generator_check: GeneratorCheckSpec = field(default_factory=GeneratorCheckSpec)
    conditions: list[str] = field(default_factory=lambda: ["ltg"])
    seeds: list[int] = field(default_factory=lambda: [0])
    trajectory: bool = False  # the A.7 trajectory analysis
    distances: bool = True  # FID / precision / recall of each condition's synthetic data vs real
    report: bool = True
    track: str = "none"  # experiment tracking (accelerate): none | tensorboard | wandb | mlflow -> <out>/tracking/
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
    check_track(cfg.track)  # a known tracker, its package installed
    if cfg.base.epochs < 0 or cfg.heads.epochs < 0:
        raise ConfigError("base.epochs and heads.epochs must be >= 0")
    check_heads(cfg.heads)
    if cfg.base.epochs > 0 and cfg.classifier.checkpoint:
        raise ConfigError("base.epochs > 0 trains the classifier from scratch: drop classifier.checkpoint, or set "
                          "base.epochs: 0 to use the checkpoint as it is")
    check_captioner(cfg.introspection)
    try:
        conditions = parse_conditions(list(cfg.conditions))
    except ValueError as err:
        raise ConfigError(f"conditions: {err}") from None
    check_judge(cfg, conditions)
    efficiency_conditions(cfg, conditions)
    check_options(cfg)
    return conditions


def check_heads(hs: HeadsSpec) -> None:
    """``heads.init`` one of ``HEAD_INITS``; ``heads.epsilon`` / ``epsilon_end`` in [0, 1]."""
    from ..heads import HEAD_INITS

    if hs.epochs > 0 and hs.num_heads < 2:
        raise ConfigError(f"heads.num_heads must be >= 2 (their disagreement is the epistemic signal), got "
                          f"{hs.num_heads}")
    if hs.init not in HEAD_INITS:
        raise ConfigError(f"heads.init must be one of {', '.join(HEAD_INITS)}, got {hs.init!r}")
    for key in ("epsilon", "epsilon_end"):
        value = getattr(hs, key)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"heads.{key} must lie in [0, 1] (1 - 1/num_heads is the plain mean), got {value}")


def check_options(cfg: MineConfig) -> None:
    """Each of ``sweep.options`` must be a non-empty mapping of valid guidance options; the error names it."""
    for i, option in enumerate(cfg.sweep.options):
        if not isinstance(option, dict) or not option:
            raise ConfigError(f"sweep.options[{i}] must be a mapping such as {{views: 4}}, got {option!r}")
        try:
            cfg.guidance.with_options(**option)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"sweep.options[{i}] {option}: {err}") from None
    if cfg.sweep.options and not cfg.sweep.signals:
        raise ConfigError("sweep.options are compared at a swept weight: list sweep.signals")


def efficiency_conditions(cfg: MineConfig, conditions: list[Condition]) -> list[Condition]:
    """The conditions of the data-efficiency curve (``efficiency``), checked: sizes >= 1, epochs >= 0, each
    condition one of the run's synthetic conditions. Empty when the curve is off."""
    ef = cfg.efficiency
    if not ef.sizes:
        return []
    if any(int(n) < 1 for n in ef.sizes):
        raise ConfigError(f"efficiency.sizes: every n (images per class) must be >= 1, got {list(ef.sizes)}")
    if ef.epochs < 0:
        raise ConfigError(f"efficiency.epochs must be >= 0 (0: schedule.epochs), got {ef.epochs}")
    synthetic = {c.text: c for c in conditions if c.synthetic}
    if not ef.conditions:
        if not synthetic:
            raise ConfigError("efficiency.sizes needs a condition with synthetic data among the run's conditions")
        return list(synthetic.values())
    unknown = [t for t in ef.conditions if t not in synthetic]
    if unknown:
        raise ConfigError(f"efficiency.conditions: {unknown} are not synthetic conditions of this run "
                          f"({sorted(synthetic)})")
    return [synthetic[t] for t in ef.conditions]


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
             "generator.guide_decoder": cfg.generator.guide_decoder, "generator.lora": cfg.generator.lora,
             "generator.vae": cfg.generator.vae}
    if cfg.generator.model and (cfg.generator.kind == "embedded" or cfg.generator.model.startswith(("/", ".", "~"))):
        from ..models.tiny import generator_dir

        named["generator.model"] = str(generator_dir(cfg.generator.model)) if cfg.generator.kind == "embedded" \
            else cfg.generator.model
    missing += [f"{key}: {path} does not exist" for key, path in named.items()
                if path and not Path(path).expanduser().exists()]
    if missing:
        raise ConfigError("the config names paths that are not there:\n  " + "\n  ".join(missing))


def check_judge(cfg: MineConfig, conditions: list[Condition]) -> None:
    """The judge settings that cannot work, named before anything runs."""
    j = cfg.judge
    if j.spec == "train" and cfg.data.source != "fashion_mnist_lt":
        raise ConfigError("judge.spec=train trains on the full balanced Fashion-MNIST set (data.source: "
                          "fashion_mnist_lt); for your data give a judge directory (classifier.json) or clip:<dir>")
    if j.spec == "shipped":
        if cfg.generator.kind != "embedded" or cfg.data.source != "fashion_mnist_lt":
            raise ConfigError("judge.spec=shipped is the embedded Fashion-MNIST default's judge (generator.kind: "
                              "embedded, data.source: fashion_mnist_lt); for your data give a judge directory "
                              "(classifier.json) or clip:<dir>")
        from ..evaluation.judge import shipped_judge_dir

        shipped_judge_dir(cfg.generator.model)  # a generator without a shipped judge is named here
    elif j.spec not in (None, "train") and not j.spec.startswith("clip:") and not Path(j.spec).expanduser().exists():
        raise ConfigError(f"judge.spec: {j.spec} does not exist (shipped | train | <dir with classifier.json> | "
                          "clip:<dir>)")
    if j.min_ratio is not None and not 0 < j.min_ratio <= 1:
        raise ConfigError(f"judge.min_ratio must lie in (0, 1], got {j.min_ratio}")
    if j.spec is None and any(c.judge_filter for c in conditions):
        raise ConfigError("a '+judge' condition needs a judge: set judge.spec")
    if j.min_ratio is not None and j.spec is None:
        raise ConfigError("judge.min_ratio needs a judge: set judge.spec")
    if j.epochs < 1 or j.real_per_class < 1:
        raise ConfigError("judge.epochs and judge.real_per_class must be >= 1")


def check_captioner(ic: IntrospectionSpec) -> tuple[str, str]:
    """``(kind, argument)`` of ``introspection.captioner``; a ConfigError naming the setting otherwise."""
    kind, _, arg = ic.captioner.partition(":")
    if (kind == "attribute" and not arg) or (kind in ("vlm", "openai") and arg):
        if kind == "openai" and not ic.llm_url:
            raise ConfigError("introspection.captioner=openai:<model> needs introspection.llm_url (the endpoint)")
        return kind, arg
    raise ConfigError("introspection.captioner must be 'attribute', 'vlm:<local model dir>' or 'openai:<model>', "
                      f"got {ic.captioner!r}")
