"""``longtail mine``: the mining loop on the user's ImageFolders, classifier and generator.

One config (YAML + overrides): data (train/val ImageFolders), classifier (any ``models.classifiers`` spec, with or
without an Epistemic Head), generator (embedded or Stable Diffusion), guidance, a generation schedule over the
fine-tuning epochs (the paper's Table 5 style), synthetic volume and per-class allocation, and the fine-tuning
recipe. Everything lands in one run directory; an interrupted run resumes from the last complete unit.
Under ``accelerate launch`` generation is sharded and fine-tuning is data parallel.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, dump_config
from .data.imagefolder import (
    ImageIndex,
    ImageListDataset,
    Preprocess,
    eval_transform,
    read_class_names,
    scan_imagefolder,
    train_transform,
)
from .data.store import SyntheticStore
from .evaluation.metrics import accuracy_report, detection_report
from .heads import EpistemicClassifier, HeadsOnly
from .mining import MiningConfig, allocate, mine
from .models.classifiers import input_channels
from .pipelines import (
    ClassifierSpec,
    GeneratorSpec,
    active,
    check_guidance,
    load_classifier_spec,
    with_sampling_defaults,
)
from .sampling import GuidanceConfig
from .train import TrainConfig, fit_loader, predict_loader


@dataclass
class DataSpec:
    train: str | None = None  # ImageFolder: <train>/<class>/<image>
    val: str | None = None
    class_names: str | None = None  # a file; default: the classifier's names, else the train folders
    allow_corrupt: bool = False  # skip unreadable images (each reported by path) instead of stopping
    many: int = 100
    few: int = 20


@dataclass
class ScheduleSpec:
    """When to generate, and how much. Epochs count fine-tuning epochs; generation happens at the start of
    each listed epoch (``generate_at``), or every ``every`` epochs from 0 up to ``until`` (default: all)."""

    epochs: int = 100
    generate_at: list[int] | None = None
    every: int = 5
    until: int | None = None
    expansion: float | None = None  # total synthetic = expansion x real training images
    total: int | None = None  # or a total count
    per_round: int | None = None  # or a count per generation round
    allocation: str = "frequency"  # frequency | even | inverse


@dataclass
class FinetuneSpec:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    num_workers: int = 2
    rotation: float = 15.0
    hflip: bool = True
    crop: str = "random"  # random (random-resized crop) | center (deterministic, e.g. for tests)
    train_heads_epochs: int = 0  # > 0: attach and train an Epistemic Head first when the classifier has none
    num_heads: int = 5
    augment: str | None = None  # a baseline augmentation (longtail.augment.AUGMENTATIONS)


@dataclass
class MineConfig:
    out: str = "runs/mine"
    data: DataSpec = field(default_factory=DataSpec)
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(weight=10.0))
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    seed: int = 0
    device: str = "auto"
    # a comparison (the paper's tables): several conditions x seeds, each run into <out>/<condition>/seed_<s>
    conditions: list[str] = field(default_factory=lambda: ["ltg"])
    seeds: list[int] | None = None


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


def make_plan(cfg: MineConfig, train: ImageIndex) -> Plan:
    epochs = generation_epochs(cfg.schedule)
    counts = train.counts()
    per_round = images_per_round(cfg.schedule, sum(counts), len(epochs))
    bounds = [*epochs, cfg.schedule.epochs]
    rounds = [{"round": i + 1, "epoch": e, "finetune_epochs": bounds[i + 1] - e,
               "counts": allocate(per_round, counts, cfg.schedule.allocation)} for i, e in enumerate(epochs)]
    return Plan(train.class_names, counts, rounds, train.skipped)


def _class_names(cfg: MineConfig, loaded) -> list[str] | None:
    if cfg.data.class_names:
        return read_class_names(cfg.data.class_names)
    return list(loaded.class_names) if loaded is not None and loaded.class_names else None


def preprocess_for(loaded) -> Preprocess:
    """The fine-tuning input size / normalisation, from the classifier's bridge config and first layer."""
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


def _loader(paths, labels, transform, mode, spec: FinetuneSpec, shuffle: bool, seed: int):
    ds = ImageListDataset(paths, labels, transform, mode)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=spec.batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=spec.num_workers, drop_last=False)


def _train_transform(pre: Preprocess, spec: FinetuneSpec):
    if spec.crop == "center":
        return eval_transform(pre)
    if spec.crop != "random":
        raise ConfigError(f"finetune.crop must be 'random' or 'center', got {spec.crop!r}")
    return train_transform(pre, spec.rotation, spec.hflip, spec.augment)


def check_paths(cfg: MineConfig) -> None:
    """Every local path the config names must exist; all missing ones are listed in one error."""
    missing = [f"data.{key} is required (an ImageFolder directory)" for key in ("train", "val")
               if not getattr(cfg.data, key)]
    named = {"data.train": cfg.data.train, "data.val": cfg.data.val, "data.class_names": cfg.data.class_names,
             "classifier.checkpoint": cfg.classifier.checkpoint, "classifier.heads": cfg.classifier.heads,
             "classifier.class_names": cfg.classifier.class_names, "generator.prompt_file": cfg.generator.prompt_file,
             "generator.guide_decoder": cfg.generator.guide_decoder}
    if cfg.generator.model and (cfg.generator.kind == "embedded" or cfg.generator.model.startswith(("/", ".", "~"))):
        named["generator.model"] = cfg.generator.model
    missing += [f"{key}: {path} does not exist" for key, path in named.items()
                if path and not Path(path).expanduser().exists()]
    if missing:
        raise ConfigError("the config names paths that are not there:\n  " + "\n  ".join(missing))


def run_mine(cfg: MineConfig, dry_run: bool = False, show: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Validate, plan and (unless ``dry_run``) run or resume the mining loop. Returns the plan / history.

    With several ``conditions`` or ``seeds`` it runs the comparison: each (condition, seed) into
    ``<out>/<condition>/seed_<s>`` with the same schedule and synthetic count, then a table of the final round
    (mean ± std over seeds), also written to ``<out>/comparison.json``.
    """
    seeds = cfg.seeds or [cfg.seed]
    if cfg.conditions == ["ltg"] and len(seeds) == 1:
        return _run_one(replace(cfg, seed=seeds[0]), dry_run, show, log)
    return run_comparison(cfg, seeds, dry_run, show, log)


def condition_config(cfg: MineConfig, cond: str, seed: int) -> MineConfig:
    """The mining config of one comparison condition (names as in ``longtail.conditions``)."""
    from .conditions import check_condition
    from .generate import gif_prompts

    check_condition(cond)
    out = Path(cfg.out) / cond.replace(":", "_").replace("@", "_w") / f"seed_{seed}"
    sub = replace(cfg, out=str(out), seed=seed, conditions=["ltg"], seeds=None)
    no_synthetic = {"schedule": replace(cfg.schedule, per_round=0, total=None, expansion=None),
                    "guidance": replace(cfg.guidance, weight=0.0)}
    if cond == "none":
        return replace(sub, **no_synthetic)
    if cond.startswith("aug:"):
        return replace(sub, **no_synthetic, finetune=replace(cfg.finetune, augment=cond[4:]))
    if cond == "unguided":
        return replace(sub, guidance=replace(cfg.guidance, weight=0.0))
    if cond == "naive":
        return replace(sub, guidance=replace(cfg.guidance, on_noisy=True))
    if cond.startswith("ltg:"):
        signal, _, weight = cond[4:].partition("@")
        return replace(sub, guidance=replace(cfg.guidance, signal=signal,
                                             weight=float(weight) if weight else cfg.guidance.weight))
    if cond == "gif":
        names = json.loads(Path(cfg.out, "class_names.json").read_text())
        prompts = Path(cfg.out) / "gif_prompts.json"
        prompts.write_text(json.dumps({n: gif_prompts(n) for n in names}, indent=2))
        return replace(sub, guidance=replace(cfg.guidance, weight=0.0),
                       generator=replace(cfg.generator, prompt_file=str(prompts)))
    if cond == "introspect":
        raise ConfigError("introspect is a demo condition; for your data, write the refined prompts of "
                          "`longtail.introspection` to a prompt file and set generator.prompt_file")
    return sub  # ltg


def run_comparison(cfg: MineConfig, seeds: list[int], dry_run: bool, show: bool, log: Callable[[str], None]) -> dict:
    from .conditions import condition_label, mean_std_cell

    check_paths(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    device = torch.device("cpu") if cfg.device == "cpu" else None
    loaded = load_classifier_spec(cfg.classifier, device or torch.device("cpu"))
    names = _class_names(cfg, loaded) or scan_imagefolder(cfg.data.train, verify=False).class_names
    (out / "class_names.json").write_text(json.dumps(names))
    results: dict[str, dict[int, dict]] = {}
    guided: dict[str, dict] = {}
    for seed in seeds:
        for cond in cfg.conditions:
            log(f"== {cond}, seed {seed}")
            sub = condition_config(cfg, cond, seed)
            if sub.guidance.weight and sub.schedule.per_round != 0:
                guided[cond] = {"signal": sub.guidance.signal, "weight": sub.guidance.weight}
            results.setdefault(cond, {})[seed] = _run_one(sub, dry_run, show, log)
    if dry_run:
        return {"conditions": results}
    keys = ("top1", "many", "medium", "few")
    table = {}
    for cond, per_seed in results.items():
        finals = [r["history"][-1] for r in per_seed.values()]
        values = {k: torch.tensor([f[k] for f in finals], dtype=torch.float64) for k in keys}
        table[cond] = {k: {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0, "n": len(v)}
                       for k, v in values.items()}
    lines = [f"{'condition':<28}" + "".join(f"{k:>16}" for k in keys)]
    for cond, row in table.items():
        label = condition_label(cond, guided.get(cond))
        lines.append(f"{label:<28}" + "".join(mean_std_cell(row[k], 16, 4) for k in keys))
    log("\n".join(lines))
    (out / "comparison.json").write_text(json.dumps({"seeds": seeds, "table": table}, indent=2))
    return {"table": table, "conditions": {c: {s: r["history"] for s, r in v.items()} for c, v in results.items()}}


def _run_one(cfg: MineConfig, dry_run: bool = False, show: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """One mining run (one condition, one seed)."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from .generate import generate_dataset, plan_jobs
    from .models.classifiers import bridged_classifier
    from .models.stable_diffusion import job_prompts, prompt_table
    from .pipelines import load_generator

    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    check_paths(cfg)
    # split_batches: each global batch is divided over the processes, so the optimisation is the same as on one
    # device up to floating-point order (BatchNorm statistics aside, which are per process)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))
    device = acc.device
    loaded = load_classifier_spec(cfg.classifier, device)
    names = _class_names(cfg, loaded)
    train = scan_imagefolder(cfg.data.train, names, cfg.data.allow_corrupt)
    outputs = loaded.num_classes
    if outputs is not None and outputs != len(train.class_names):
        raise ConfigError(f"the classifier has {outputs} outputs but {cfg.data.train} has "
                          f"{len(train.class_names)} classes {train.class_names}")
    val = scan_imagefolder(cfg.data.val, train.class_names, cfg.data.allow_corrupt)
    plan = make_plan(cfg, train)
    pre = preprocess_for(loaded)
    guidance = active(cfg.guidance)
    needs_heads = guidance is not None and not isinstance(loaded.model, EpistemicClassifier)
    if needs_heads and cfg.finetune.train_heads_epochs <= 0:
        check_guidance(guidance, loaded)
    log(plan.format())
    ldm, guide, _ = load_generator(cfg.generator, device)
    table = prompt_table(train.class_names, cfg.generator.prompt_template, cfg.generator.prompt_file)
    gs = cfg.generator
    if dry_run:
        estimate = _estimate(ldm, guide, loaded, guidance, table, gs, plan, needs_heads)
        log(f"estimated generation time: {estimate['seconds_per_image']:.2f} s/image, "
            f"{estimate['total_hours']:.2f} h for all rounds (from a warm-up of {estimate['warmup_images']} images x "
            f"{estimate['warmup_steps']} steps, scaled to {gs.num_steps} steps)")
        return {"plan": plan.__dict__, "estimate": estimate}

    run = Path(cfg.out)
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "config.yaml")
        (run / "plan.json").write_text(json.dumps(plan.__dict__, indent=2))
        if train.skipped:
            (run / "skipped_images.json").write_text(json.dumps(train.skipped + val.skipped, indent=2))
    model = loaded.model
    ft = TrainConfig(lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay, seed=cfg.seed,
                     augment=cfg.finetune.augment)
    train_tf = _train_transform(pre, cfg.finetune)
    if needs_heads:
        model = _attach_heads(model, cfg, run, train, train_tf, pre, acc, show, log)
        loaded.model = model
    val_loader = _loader(val.paths, val.labels, eval_transform(pre), pre.mode, cfg.finetune, False, 0)
    groups = [("many" if n > cfg.data.many else "few" if n < cfg.data.few else "medium") for n in plan.real_counts]

    def evaluate(m: nn.Module) -> dict:
        out, labels = predict_loader(m, val_loader, acc)
        report = accuracy_report(out.logits.argmax(-1), labels, groups)
        if out.head_logits is not None:
            report["detection"] = detection_report(out, labels, groups)
        return report

    classifier = bridged_classifier(loaded)
    meta = {"weight": cfg.guidance.weight if guidance else 0.0, "model": f"{gs.kind}:{gs.model or 'shipped'}",
            "num_steps": gs.num_steps, "cfg_scale": gs.cfg_scale}

    def synthesize(r: int, m: nn.Module, counts: list[int], store: SyntheticStore) -> None:
        jobs = plan_jobs(counts, job_prompts(table), base_seed=cfg.seed, start=[(r - 1) * n for n in counts])
        generate_dataset(ldm, jobs, store.root, train.class_names, meta={**meta, "round": r}, prefix=f"r{r}_",
                         process_index=acc.process_index, num_processes=acc.num_processes, chunk=gs.batch_size * 4,
                         show=show and acc.is_main_process, classifier=classifier, guidance=guidance,
                         num_steps=gs.num_steps, cfg_scale=gs.cfg_scale, negative_prompt=gs.negative_prompt,
                         batch_size=gs.batch_size, guide_decode=guide, record_signal=cfg.guidance.signal)
        acc.wait_for_everyone()
        if acc.is_main_process:
            store.merge()
        acc.wait_for_everyone()

    bounds = [r["epoch"] for r in plan.rounds] + [cfg.schedule.epochs]

    def finetune(m: nn.Module, rows: list[dict[str, str]], r: int) -> list[float]:
        root = run / "synthetic"
        lookup = {n: i for i, n in enumerate(train.class_names)}
        paths = train.paths + [root / row["path"] for row in rows]
        labels = train.labels + [lookup[row["class_name"]] for row in rows]
        loader = _loader(paths, labels, train_tf, pre.mode, cfg.finetune, True, cfg.seed * 1000 + r)
        return fit_loader(m, loader, ft, accelerator=acc, first_epoch=bounds[r - 1], last_epoch=bounds[r],
                          total_epochs=cfg.schedule.epochs, num_classes=len(train.class_names),
                          desc=f"fine-tune round {r}", show=show)

    mcfg = MiningConfig(rounds=len(plan.rounds), images_per_round=sum(plan.rounds[0]["counts"]),
                        allocation=cfg.schedule.allocation)
    started = time.perf_counter()
    history = mine(model, synthesize, finetune, evaluate, mcfg, plan.real_counts, run,
                   is_main=acc.is_main_process, barrier=acc.wait_for_everyone)
    if acc.is_main_process:
        (run / "metrics.json").write_text(json.dumps({"plan": plan.__dict__, "history": history,
                                                      "seconds": time.perf_counter() - started}, indent=2))
        for row in history:
            log(f"round {row['round']}: synthetic {row['synthetic']}, top-1 {row['top1']:.4f}, many "
                f"{row['many']:.4f}, medium {row['medium']:.4f}, few {row['few']:.4f}")
    return {"plan": plan.__dict__, "history": history}


def _attach_heads(model, cfg: MineConfig, run: Path, train: ImageIndex, train_tf, pre: Preprocess, acc, show, log):
    """Wrap the classifier in an Epistemic Head and train only the heads (base untouched), once per run."""
    from safetensors.torch import load_file

    wrapped = EpistemicClassifier(model, num_heads=cfg.finetune.num_heads, head_name=cfg.classifier.head_name,
                                  seed=cfg.seed)
    path = run / "heads.safetensors"
    if path.is_file():
        wrapped.heads.load_state_dict(load_file(str(path)))
        return wrapped
    log(f"training an Epistemic Head ({cfg.finetune.num_heads} heads) for {cfg.finetune.train_heads_epochs} epochs")
    loader = _loader(train.paths, train.labels, train_tf, pre.mode, cfg.finetune, True, cfg.seed)
    heads_only = HeadsOnly(wrapped)
    fit_loader(heads_only, loader, TrainConfig(lr=cfg.finetune.lr, epochs=cfg.finetune.train_heads_epochs,
                                               seed=cfg.seed), accelerator=acc, desc="epistemic head", show=show)
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        wrapped.save_heads(path)
    return wrapped


def _estimate(ldm, guide, loaded, guidance, table, gs: GeneratorSpec, plan: Plan, needs_heads: bool) -> dict:
    """Time a short guided warm-up (one batch of up to 8 images, 2 steps) and scale it to the plan's steps and
    image count. Batches larger than 8 are usually faster per image, so the estimate errs high."""
    from .generate import generate, plan_jobs
    from .models.classifiers import bridged_classifier
    from .models.stable_diffusion import job_prompts

    n = max(1, min(gs.batch_size, 8))
    jobs = plan_jobs([n] + [0] * (len(table) - 1), job_prompts(table))
    warm_guidance = None if needs_heads else guidance
    generate(ldm, jobs[:1], classifier=bridged_classifier(loaded), guidance=warm_guidance, num_steps=1,
             cfg_scale=gs.cfg_scale, batch_size=1, show=False)  # first-call overheads
    started = time.perf_counter()
    generate(ldm, jobs, classifier=bridged_classifier(loaded), guidance=warm_guidance, num_steps=2,
             cfg_scale=gs.cfg_scale, batch_size=n, guide_decode=guide, show=False)
    per_image = (time.perf_counter() - started) / len(jobs) * gs.num_steps / 2
    total = sum(sum(r["counts"]) for r in plan.rounds)
    return {"seconds_per_image": per_image, "total_hours": per_image * total / 3600, "warmup_images": len(jobs),
            "warmup_steps": 2, "images": total}
