"""The stages of a mining run (base classifier and Epistemic Head, sweep, introspection, mining, trajectory,
distances) and what they share: the run context, the data source, training and evaluation. Each stage reads
and writes only the run directory and resumes from what it finds there."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..conditions import Condition
from ..config import ConfigError
from ..data.sources import DataSource, FashionMNISTLT, ImageFolderSource
from ..data.store import SyntheticStore
from ..evaluation.metrics import accuracy_report, detection_report, signal_scores
from ..evaluation.stats import mean_std, number_cell
from ..files import read_json, write_json
from ..heads import EpistemicClassifier, HeadLoss, HeadsOnly
from ..mining import MiningConfig, mine, save_state
from ..models.classifiers import LoadedClassifier, bridged_classifier, input_channels
from ..outputs import ClassifierOutput
from ..sampling import GuidanceConfig
from .common import (
    ClassifierSpec,
    check_guidance,
    load_classifier_spec,
    resolve_classifier_spec,
    write_classifier_json,
)
from .mine_config import FinetuneSpec, HeadsSpec, IntrospectionSpec, MineConfig, Plan, check_captioner

Log = Callable[[str], None]


# --- set-up ---------------------------------------------------------------------------------------------------


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
        try:
            return FashionMNISTLT(d.data_dir, d.n_max, d.imbalance, d.data_seed, d.many, d.few, d.eval_split,
                                  d.val_per_class, d.nuisance, d.nuisance_eval), []
        except ValueError as err:
            raise ConfigError(str(err)) from None
    train = scan_imagefolder(d.train, class_names_for(cfg, loaded), d.allow_corrupt)
    outputs = loaded.num_classes
    if outputs is not None and outputs != len(train.class_names):
        raise ConfigError(f"the classifier has {outputs} outputs but {d.train} has "
                          f"{len(train.class_names)} classes {train.class_names}")
    val = scan_imagefolder(d.val, train.class_names, d.allow_corrupt)
    source = ImageFolderSource(train, val, preprocess_for(loaded), d.many, d.few, f"validation ImageFolder {d.val}")
    return source, train.skipped + val.skipped


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
    hard: torch.Tensor | None = None  # [N] bool: evaluation images most base classifiers get wrong
    judge: object = None  # longtail.evaluation.judge.Judge, when the run has one
    round0: dict = field(default_factory=dict)  # seed -> the base classifier's evaluation (round 0 of mining)
    # seed -> the base stage's predictions on the evaluation split (ClassifierOutput, labels), reused by mining's
    # round 0 instead of a second pass of the same classifier over the same images (set only in this process)
    base_predictions: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process


# --- training and evaluation --------------------------------------------------------------------------------


def train_config(recipe: FinetuneSpec, lr: float | None = None, epochs: int = 1, seed: int = 0):
    from ..train import TrainConfig

    return TrainConfig(epochs=epochs, lr=recipe.lr if lr is None else lr, weight_decay=recipe.weight_decay,
                       batch_size=recipe.batch_size, rotation=recipe.rotation, translate=recipe.translate,
                       hflip=recipe.hflip, augment=recipe.augment, seed=seed, loss=recipe.loss, tau=recipe.tau)


def train_epochs(ctx: Context, model: nn.Module, recipe: FinetuneSpec, *, seed: int, first: int, last: int,
                 total: int, rows=(), store_root: Path | None = None, lr: float | None = None,
                 desc: str = "train") -> list[float]:
    """Epochs ``[first, last)`` of a cosine schedule over ``total`` on real (+ synthetic) data."""
    return train_on(ctx.source, model, recipe, accelerator=ctx.acc, seed=seed, first=first, last=last, total=total,
                    rows=rows, store_root=store_root, lr=lr, desc=desc, show=ctx.show)


def train_on(source: DataSource, model: nn.Module, recipe: FinetuneSpec, *, accelerator, seed: int, first: int,
             last: int, total: int, rows=(), store_root: Path | None = None, lr: float | None = None,
             desc: str = "train", show: bool = True) -> list[float]:
    """Epochs ``[first, last)`` of a cosine schedule over ``total`` on ``source``'s real (+ synthetic ``rows``)
    data, with ``recipe`` (``lr`` overrides its learning rate) under ``accelerator``; returns the mean loss per
    epoch (``longtail.train.fit``, whose errors it raises)."""
    from ..train import fit, tensor_augment

    loader = source.train_loader(recipe, seed, rows, store_root)
    tc = train_config(recipe, lr, total, seed)
    return fit(model, loader, tc, accelerator=accelerator, first_epoch=first, last_epoch=last, total_epochs=total,
               num_classes=len(source.class_names), desc=desc, show=show, class_counts=source.class_counts(rows),
               batch_transform=tensor_augment(tc) if source.batch_augment else None)


def evaluate(ctx: Context, model: nn.Module, detection: bool = False, scores_path: Path | None = None,
             splits: bool = True, predictions: tuple[ClassifierOutput, torch.Tensor] | None = None) -> dict:
    """Accuracy on the evaluation split (top-1, per class, Many / Medium / Few); with ``detection`` also the
    signals' AUROC for rare and hard examples, and (``scores_path``) every example's signals for ROC curves;
    with ``splits`` the extra evaluation splits (:func:`evaluate_splits`). ``predictions``: ``model``'s
    ``(output, labels)`` on the evaluation split when already computed (``predict_loader``), else computed."""
    from safetensors.torch import save_file

    from ..evaluation.stats import accuracy_on
    from ..train import predict_loader

    out, labels = predictions or predict_loader(model, ctx.source.eval_loader(), ctx.acc)
    preds = out.logits.argmax(-1)
    groups = ctx.source.groups
    report = accuracy_report(preds, labels, groups)
    if ctx.hard is not None:
        report["hard"] = accuracy_on(ctx.hard, preds == labels)
    if splits and (extra := evaluate_splits(ctx, model)):
        report["splits"] = extra
    if detection or out.head_logits is not None:
        report["detection"] = detection_report(out, labels, groups)
    if scores_path is not None and ctx.is_main:
        tensors = {f"signal/{k}": v.contiguous() for k, v in signal_scores(out).items()}
        tensors.update(labels=labels.contiguous(), preds=preds.contiguous(),
                       rare=torch.tensor([groups[int(y)] == "few" for y in labels]))
        save_file(tensors, str(scores_path))
    return report


def evaluate_splits(ctx: Context, model: nn.Module) -> dict[str, dict]:
    """Top-1 and Many / Medium / Few on each extra evaluation split (``nuisance:<mode>``); ``{}`` without any."""
    from ..train import predict_loader

    out = {}
    for name, loader in ctx.source.extra_eval_loaders().items():
        extra, extra_labels = predict_loader(model, loader, ctx.acc)
        split = accuracy_report(extra.logits.argmax(-1), extra_labels, ctx.source.groups)
        out[name] = {k: split[k] for k in ("top1", "many", "medium", "few")}
    return out


# --- stage: base classifier (+ Epistemic Head) --------------------------------------------------------------


def hard_split(ctx: Context, min_wrong: float = 0.5) -> torch.Tensor | None:
    """The evaluation images that at least ``min_wrong`` of the seeds' base classifiers get wrong (the analog of
    ImageNet-A), from each base stage's saved predictions; None with fewer than two seeds."""
    from ..evaluation.stats import hard_examples
    from ..files import read_state_dict

    seeds = ctx.cfg.seeds
    if len(seeds) < 2:
        return None
    correct = {}
    for s in seeds:
        scores = read_state_dict(base_dir_of(ctx.run, s) / "test_scores.safetensors", "base-stage predictions")
        correct[s] = scores["preds"] == scores["labels"]
    return hard_examples(correct, min_wrong)


def base_dir_of(run: Path, seed: int) -> Path:
    return run / f"seed_{seed}" / "base"


def head_loss_of(hs, seed: int) -> HeadLoss:
    """The heads' training loss as ``heads`` configures it; ``seed`` fixes each head's bootstrap resample."""
    return HeadLoss(epsilon=hs.epsilon, epsilon_end=hs.epsilon_end, bootstrap=hs.bootstrap, seed=seed)


def load_base(ctx: Context, seed: int) -> LoadedClassifier:
    """The seed's base classifier as the base stage left it (its ``classifier.json``)."""
    loaded = load_classifier_spec(ClassifierSpec(spec=str(base_dir_of(ctx.run, seed) / "classifier.json")),
                                  ctx.acc.device)
    if isinstance(loaded.model, EpistemicClassifier):
        loaded.model.head_loss = head_loss_of(ctx.cfg.heads, seed)  # fine-tuning rounds train the heads with it
    return loaded


def stage_base(ctx: Context, seed: int) -> tuple[LoadedClassifier, dict]:
    """Train (or take) the seed's classifier, attach and train an Epistemic Head if asked, evaluate."""
    from ..train import predict_loader

    cfg, base_dir = ctx.cfg, base_dir_of(ctx.run, seed)
    metrics_path = base_dir / "metrics.json"
    if metrics_path.is_file() and (base_dir / "classifier.json").is_file():
        return load_base(ctx, seed), read_json(metrics_path)
    started = time.perf_counter()
    cs = resolve_classifier_spec(cfg.classifier)  # a run's classifier.json becomes its spec (absolute paths)
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
    ctx.base_predictions[seed] = predict_loader(loaded.model, ctx.source.eval_loader(), ctx.acc)
    metrics = {**evaluate(ctx, loaded.model, detection=True, scores_path=base_dir / "test_scores.safetensors",
                          predictions=ctx.base_predictions[seed]),
               "seconds": time.perf_counter() - started}
    if cfg.base.ensemble > 0 and "detection" in metrics:
        metrics["detection"].update(ensemble_detection(ctx, seed))
    if ctx.is_main:
        write_classifier_json(base_dir, cs.spec, checkpoint, model_kwargs=cs.model_kwargs,
                              num_classes=len(ctx.source.class_names), class_names=ctx.source.class_names,
                              preprocess=cs.preprocess, heads=heads, num_heads=num_heads, head_name=cs.head_name)
        write_json(metrics_path, metrics)
    ctx.acc.wait_for_everyone()
    ctx.log(f"seed {seed}: base classifier top-1 {number_cell(metrics['top1'])} (many "
            f"{number_cell(metrics['many'])}, medium {number_cell(metrics['medium'])}, few {number_cell(metrics['few'])})")
    return loaded, metrics


def attach_heads(ctx: Context, model: nn.Module, seed: int) -> EpistemicClassifier:
    """Epistemic Head (copies of the trained head + noise, or fresh), trained with ``heads``' loss, base frozen."""
    hs = ctx.cfg.heads
    ctx.log(f"training an Epistemic Head ({hs.num_heads} heads) for {hs.epochs} epochs (seed {seed})")
    return train_heads(model, hs, ctx.source, ctx.cfg.finetune, accelerator=ctx.acc, seed=seed,
                       head_name=ctx.cfg.classifier.head_name, show=ctx.show)


def train_heads(model: nn.Module, hs: HeadsSpec, source: DataSource, recipe: FinetuneSpec, *, accelerator,
                seed: int, head_name: str | None = None, show: bool = True) -> EpistemicClassifier:
    """Attach ``hs.num_heads`` heads to ``model`` (``EpistemicClassifier``, ``hs.init`` / ``hs.init_noise``, seeded)
    and train only them (``HeadsOnly``: base in eval mode, out of the optimizer, so its weights and logits stay
    bit-identical) for ``hs.epochs`` epochs of ``source``'s training data with ``recipe`` at ``hs.lr``, under
    ``hs``' loss (``head_loss_of``). The one head-training routine of ``longtail mine`` and ``longtail heads
    train``. Raises ``ValueError`` when no linear head is found (``find_head``) or for a bad ``hs``."""
    wrapped = EpistemicClassifier(model, num_heads=hs.num_heads, head_name=head_name, init_noise=hs.init_noise,
                                  seed=seed, init=hs.init)
    wrapped.head_loss = head_loss_of(hs, seed)
    train_on(source, HeadsOnly(wrapped), recipe, accelerator=accelerator, seed=seed, first=0, last=hs.epochs,
             total=hs.epochs, lr=hs.lr, desc=f"epistemic head (seed {seed})", show=show)
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


def generator_nuisance(cfg: MineConfig) -> tuple[dict, int] | None:
    """``(rates, seed)`` of the nuisance modes the embedded generator was trained with (its metadata), or
    None (a clean or Stable Diffusion generator)."""
    import json

    from ..models.tiny import META_FILE, generator_dir

    if cfg.generator.kind != "embedded":
        return None
    meta_path = generator_dir(cfg.generator.model) / META_FILE
    meta = json.loads(meta_path.read_text()).get("nuisance") if meta_path.is_file() else None
    return (dict(meta["rates"]), int(meta.get("seed", 0))) if meta else None


def stage_judge(ctx: Context):
    """The run's judge (``judge.spec``), trained once and kept in ``<run>/judge/`` when asked; None without one."""
    from ..evaluation.judge import (
        clip_judge,
        copy_judge,
        fashion_mnist_train,
        load_judge,
        save_judge,
        shipped_judge_dir,
        train_judge,
    )

    spec, names = ctx.cfg.judge.spec, ctx.source.class_names
    if spec is None:
        return None
    if spec.startswith("clip:"):
        judge = clip_judge(spec[5:], names, device=ctx.acc.device)
    elif spec == "shipped":
        folder = ctx.run / "judge"
        if not (folder / "classifier.json").is_file() and ctx.is_main:
            source = shipped_judge_dir(ctx.cfg.generator.model)
            ctx.log(f"judge: the shipped one for the {ctx.cfg.generator.model or 'clean'} generator ({source.name})")
            copy_judge(source, folder)
        ctx.acc.wait_for_everyone()
        judge = load_judge(folder, ctx.acc.device)
    elif spec == "train":
        folder = ctx.run / "judge"
        if not (folder / "classifier.json").is_file():
            modes = generator_nuisance(ctx.cfg)
            note = ", with the generator's nuisance modes" if modes else ""
            ctx.log(f"training the judge on the full balanced training set ({ctx.cfg.judge.epochs} epochs{note})")
            images, labels = fashion_mnist_train(ctx.cfg.data.data_dir, *(modes or (None, 0)))
            model = train_judge(images, labels, len(names), epochs=ctx.cfg.judge.epochs, seed=10_000,
                                show=ctx.show, accelerator=ctx.acc)
            if ctx.is_main:
                save_judge(model, folder, names)
            ctx.acc.wait_for_everyone()
        judge = load_judge(folder, ctx.acc.device)
    else:
        judge = load_judge(spec, ctx.acc.device)
    judge.check_classes(names)
    return judge


def real_reference(ctx: Context, per_class: int):
    """Up to ``per_class`` evaluation images of each class (the first ones): ``[N, C, H, W]`` in [-1, 1] (the
    decoder's range, which the judge takes) and labels ``[N]``."""
    images, labels = ctx.source.eval_inputs()
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(ctx.source.class_names))])
    pre = getattr(ctx.source, "pre", None)  # an ImageFolder's images come in the classifier's normalisation
    return (to_decoder_range(images[keep], pre.mean, pre.std) if pre is not None else images[keep]), labels[keep]


def to_decoder_range(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Classifier input ``[N, C, H, W]`` normalised with per-channel ``mean`` / ``std`` -> [-1, 1]
    (``(x * std + mean) * 2 - 1``), the range of decoded images."""
    shape = (1, -1, 1, 1)
    return (images * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)) * 2 - 1


def stage_sweep(ctx: Context, loaded: LoadedClassifier, judge=None) -> dict | None:
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

    real = real_reference(ctx, ctx.cfg.judge.real_per_class) if judge is not None else (None, None)
    result = calibrate(generate_fn, torch.tensor([j.class_id for j in jobs]), sw.signals, sw.weights,
                       ctx.run / "sweep", base=replace(ctx.cfg.guidance, weight=0.0), min_p_ratio=sw.min_p_ratio,
                       per_class_in_grid=min(2, sw.images_per_class), log=ctx.log, judge=judge,
                       real_images=real[0], real_labels=real[1], min_judge_ratio=ctx.cfg.judge.min_ratio,
                       class_names=ctx.source.class_names, options=[dict(o) for o in sw.options],
                       option_signal=ctx.cfg.guidance.signal if ctx.cfg.guidance.signal in sw.signals else None)
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
        refined = refine_prompts(pairs, name, backend=backend, max_tokens=ctx.ldm.max_length,
                                 count_tokens=ctx.ldm.count_tokens)
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
                 intro_prompts: dict[str, list[str]] | None, run_dir: Path | None = None) -> list[dict]:
    """One condition for one seed, from the seed's base classifier (resumable): generate, fine-tune, evaluate.

    ``plan``'s rounds give the generation epochs and counts; the last round's ``finetune_epochs`` ends the
    schedule. ``run_dir`` defaults to ``seed_<s>/mining/<condition>``."""
    from ..generate import generate_dataset, plan_jobs

    cfg, acc = ctx.cfg, ctx.acc
    run_dir = run_dir or ctx.run / f"seed_{seed}" / "mining" / cond.dirname
    loaded = load_base(ctx, seed)
    model, classifier = loaded.model, bridged_classifier(loaded)
    if guidance is not None:
        check_guidance(guidance, loaded)
    gs, prompt = cfg.generator, _prompt_fn(ctx, cond, intro_prompts)
    meta = {"weight": guidance.weight if guidance else 0.0, "model": f"{gs.kind}:{gs.model or 'shipped'}",
            "num_steps": gs.num_steps, "cfg_scale": gs.cfg_scale}

    factor = cond.factor or 1  # best-of-N: N candidates per kept image
    signal = cond.selection_signal(cfg.guidance) if cond.kind == "bestof" else (guidance or cfg.guidance).signal

    def generate_into(target: SyntheticStore, r: int, counts: list[int], start: list[int]) -> None:
        jobs = plan_jobs(counts, prompt, base_seed=seed, start=start)
        generate_dataset(ctx.ldm, jobs, target.root, ctx.source.class_names, meta={**meta, "round": r},
                         prefix=f"r{r}_", process_index=acc.process_index, num_processes=acc.num_processes,
                         chunk=gs.batch_size * 4, show=ctx.show and ctx.is_main, classifier=classifier,
                         guidance=guidance, num_steps=gs.num_steps, cfg_scale=gs.cfg_scale,
                         negative_prompt=gs.negative_prompt, batch_size=gs.batch_size, guide_decode=ctx.guide_decode,
                         record_signal=signal, desc=f"{cond.text} r{r} (seed {seed})")
        acc.wait_for_everyone()
        if ctx.is_main:
            target.merge()
        acc.wait_for_everyone()

    def synthesize(r: int, m: nn.Module, counts: list[int], store: SyntheticStore) -> None:
        if cond.judge_filter:
            return judge_filtered(r, counts, store)
        made = [n * factor for n in counts]
        target = SyntheticStore(run_dir / "candidates") if factor > 1 else store
        generate_into(target, r, made, start=[(r - 1) * n for n in made])
        if factor > 1 and ctx.is_main:  # best-of-N: keep the top 1/N of the round per class
            keep_best(SyntheticStore(target.root), store, counts, ctx.source.class_names, r)
            store.merge()
        acc.wait_for_everyone()

    def judge_filtered(r: int, counts: list[int], store: SyntheticStore) -> None:
        """Generate, drop what the judge does not recognise as its class, generate replacements (new indices,
        so a re-run resumes), until every class has its count; then copy the accepted images into ``store``."""
        candidates = SyntheticStore(run_dir / "candidates")
        verdicts: dict[str, bool] = {}
        for _ in range(JUDGE_FILTER_PASSES):
            rows = [row for row in SyntheticStore(candidates.root).rows() if row.get("round") == str(r)]
            judge_rows(ctx.judge, candidates.root, [row for row in rows if row["id"] not in verdicts],
                       ctx.source.class_names, verdicts)
            made = [sum(row["class_name"] == n for row in rows) for n in ctx.source.class_names]
            ok = [sum(row["class_name"] == n and verdicts[row["id"]] for row in rows) for n in ctx.source.class_names]
            short = [max(0, need - have) for need, have in zip(counts, ok, strict=True)]
            if not any(short):
                break
            generate_into(candidates, r, short, start=[JUDGE_FILTER_STRIDE * (r - 1) + n for n in made])
        else:
            raise RuntimeError(f"{cond.text} round {r}: the judge rejected too many images; after "
                               f"{JUDGE_FILTER_PASSES} passes some classes still lack accepted images")
        if ctx.is_main:
            accepted = sorted((row for row in rows if verdicts[row["id"]]), key=lambda row: row["id"])
            keep = [row for c, n in enumerate(ctx.source.class_names)
                    for row in [x for x in accepted if x["class_name"] == n][: counts[c]]]
            copy_rows(candidates, store, keep)
            store.merge()
        acc.wait_for_everyone()

    last_round = plan.rounds[-1]
    bounds = [r["epoch"] for r in plan.rounds] + [last_round["epoch"] + last_round["finetune_epochs"]]
    recipe = replace(cfg.finetune, augment=cond.augment) if cond.kind == "aug" else cfg.finetune

    def finetune(m: nn.Module, rows: list[dict[str, str]], r: int) -> list[float]:
        first, last = bounds[r - 1], bounds[r]
        if cfg.schedule.restart:
            first, last, total = 0, last - first, last - first
        else:
            total = bounds[-1]
        return train_epochs(ctx, m, recipe, seed=seed * 1000 + r, first=first, last=last, total=total, rows=rows,
                            store_root=run_dir / "synthetic", desc=f"fine-tune {cond.text} r{r} (seed {seed})")

    mcfg = MiningConfig(rounds=len(plan.rounds), images_per_round=sum(plan.rounds[0]["counts"]),
                        allocation=cfg.schedule.allocation)
    # every condition of a seed starts from the seed's base classifier: round 0 is evaluated once per seed; the
    # extra splits only for the final classifier (below), as only its figures are reported
    pending_round0 = [not (run_dir / "round_0" / "metrics.json").is_file()]

    def evaluate_round(m: nn.Module) -> dict:
        if pending_round0[0]:
            pending_round0[0] = False
            if seed not in ctx.round0:  # the same classifier the base stage evaluated: its predictions, if kept
                ctx.round0[seed] = evaluate(ctx, m, splits=False, predictions=ctx.base_predictions.get(seed))
            return copy.deepcopy(ctx.round0[seed])
        return evaluate(ctx, m, splits=False)

    history = mine(model, synthesize if cond.synthetic else None, finetune, evaluate_round, mcfg,
                   plan.real_counts, run_dir, is_main=ctx.is_main, barrier=acc.wait_for_everyone)
    final = history[-1]
    if ctx.source.extra_eval_loaders() and "splits" not in final:
        final["splits"] = evaluate_splits(ctx, model)
        if ctx.is_main:
            write_json(run_dir / f"round_{len(history) - 1}" / "metrics.json", final)
        acc.wait_for_everyone()
    ctx.log(f"seed {seed} {cond.text:9s}: top-1 {number_cell(final['top1'])}  few {number_cell(final['few'])}")
    return history


JUDGE_FILTER_PASSES = 10  # generation passes before a judge-filtered round gives up
JUDGE_FILTER_STRIDE = 100_000  # image indices per round in the candidate store (rounds never collide)


def judge_rows(judge, root: Path, rows: list[dict[str, str]], class_names: list[str],
               verdicts: dict[str, bool]) -> None:
    """Fill ``verdicts[id]``: whether the judge's top class is the image's intended class."""
    import numpy as np
    from PIL import Image

    if not rows:
        return
    lookup = {n: i for i, n in enumerate(class_names)}
    pixels = np.stack([np.asarray(Image.open(root / row["path"])) for row in rows])
    images = torch.from_numpy(pixels).float() / 127.5 - 1.0
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    preds = judge.probs(images).argmax(-1)
    for row, pred in zip(rows, preds.tolist(), strict=True):
        verdicts[row["id"]] = pred == lookup[row["class_name"]]


def copy_rows(source: SyntheticStore, store: SyntheticStore, rows: list[dict[str, str]]) -> int:
    """Copy ``rows`` (their images and manifest records) from one store into another; returns how many were new."""
    import numpy as np
    from PIL import Image

    if not rows:
        return 0
    return store.add(np.stack([np.asarray(Image.open(source.root / row["path"])) for row in rows]), rows)


def keep_best(candidates: SyntheticStore, store: SyntheticStore, counts: list[int], class_names: list[str],
              r: int) -> int:
    """Best-of-N selection: copy, per class c, the ``counts[c]`` candidates of round ``r`` with the highest
    recorded signal (manifest column ``signal``; ties by id) into ``store``. Returns how many were new.

    Raises ``ValueError`` when a class has fewer candidates than it needs (an incomplete generation).
    """

    rows = [row for row in candidates.rows() if row.get("round") == str(r)]
    keep: list[dict[str, str]] = []
    for c, name in enumerate(class_names):
        pool = sorted((row for row in rows if row["class_name"] == name),
                      key=lambda row: (-float(row["signal"]), row["id"]))
        if len(pool) < counts[c]:
            raise ValueError(f"{candidates.root}: class {name!r} has {len(pool)} candidates in round {r}, "
                             f"needs {counts[c]}")
        keep += pool[: counts[c]]
    return copy_rows(candidates, store, keep)


def nested_subset(larger: Path, target: Path, cond: Condition, n: int) -> int:
    """Seed ``target`` (a mining directory of ``n`` images per class in one round) from ``larger`` (the same
    condition, seed and classifier with more images per class): its first ``n`` jobs per class, or for best-of-N
    its first ``n x N`` candidates, are exactly what ``target`` would generate. Judge-filtered conditions draw
    replacements in another order, so they are not copied. Does nothing when ``target`` already has images;
    returns how many were copied."""
    if cond.judge_filter:
        return 0
    folder, limit = ("candidates", n * cond.factor) if cond.factor else ("synthetic", n)
    source, store = SyntheticStore(larger / folder), SyntheticStore(target / folder)
    if len(store) or not len(source):
        return 0
    copied = copy_rows(source, store, [row for row in source.rows() if row.get("round") == "1"
                                       and int(row["index"]) < limit])
    store.merge()
    return copied


def stage_efficiency(ctx: Context, conditions: list[Condition], guidance_of: Callable[[Condition], object],
                     plan: Plan, intro_prompts: dict[str, list[str]] | None) -> dict:
    """The data-efficiency curve: accuracy after one round of n synthetic images per class, per size n in
    ``efficiency.sizes``, condition and seed (resumable; ``seed_<s>/efficiency/n<n>/<condition>/``), with the
    paired difference to ``unguided`` per size when it is among the conditions -> ``efficiency.json``."""
    from ..evaluation.stats import paired_table
    from .mine_config import efficiency_conditions

    ef, seeds = ctx.cfg.efficiency, ctx.cfg.seeds
    chosen = efficiency_conditions(ctx.cfg, conditions)
    sizes = sorted({int(n) for n in ef.sizes}, reverse=True)  # the largest first, the others are copied from it
    epochs = ef.epochs or ctx.cfg.schedule.epochs
    classes = len(ctx.source.class_names)
    final: dict[int, dict[str, dict[int, dict]]] = {}
    for seed in seeds:
        final[seed] = {}
        for cond in chosen:
            final[seed][cond.text] = {}
            largest = None
            for n in sizes:
                run_dir = ctx.run / f"seed_{seed}" / "efficiency" / f"n{n}" / cond.dirname
                if largest is not None and ctx.is_main:
                    nested_subset(largest, run_dir, cond, n)
                ctx.acc.wait_for_everyone()
                one_round = replace(plan, rounds=[{"round": 1, "epoch": 0, "finetune_epochs": epochs,
                                                   "counts": [n] * classes}])
                history = stage_mining(ctx, seed, cond, guidance_of(cond), one_round, intro_prompts, run_dir)
                final[seed][cond.text][n] = history[-1]
                largest = largest or run_dir
    keys = ("few", "medium", "many", "top1")
    table = {c.text: {str(n): {k: mean_std([final[s][c.text][n].get(k) for s in seeds]) for k in keys}
                      for n in sorted(sizes)} for c in chosen}
    paired = {}
    if "unguided" in table:
        for n in sorted(sizes):
            paired[str(n)] = paired_table({s: {c.text: final[s][c.text][n] for c in chosen} for s in seeds},
                                          baseline="unguided", metrics=("few", "top1"))
    result = {"sizes": sorted(sizes), "epochs": epochs, "seeds": list(seeds), "conditions": [c.text for c in chosen],
              "table": table, "paired": paired}
    if ctx.is_main:
        write_json(ctx.run / "efficiency.json", result)
    return result


def stage_modes(ctx: Context, conditions: list[Condition]) -> dict:
    """Share of each nuisance mode among every synthetic condition's images (all seeds pooled), overall and per
    class -> ``modes.json``: ``{"conditions": {condition: shares}, "captioner": {condition: shares},
    "detector": report | None}``. ``conditions`` holds the mode detector's shares (all eight modes; trained
    once on the full Fashion-MNIST training set, kept in ``modes/detector``, its recall and false alarms in
    ``detector``) for the embedded testbed, else the attribute captioner's (``longtail.evaluation.modes``)."""
    from ..evaluation.modes import detected_shares, mode_shares

    path = ctx.run / "modes.json"
    if path.is_file():
        return read_json(path)
    detector, report = mode_detector(ctx) if ctx.cfg.data.source == "fashion_mnist_lt" else (None, None)
    by_detector: dict[str, dict] = {}
    by_captioner: dict[str, dict] = {}
    for cond in conditions:
        parts = [ctx.source.synthetic_inputs(store) for s in ctx.cfg.seeds
                 if ((store := ctx.run / f"seed_{s}" / "mining" / cond.dirname / "synthetic") / "manifest.csv").is_file()]
        if parts:
            images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            by_captioner[cond.text] = mode_shares(images, labels.tolist(), ctx.source.class_names)
            if detector is not None:
                by_detector[cond.text] = detected_shares(detector, images, labels.tolist(), ctx.source.class_names)
    result = {"conditions": by_detector if detector is not None else by_captioner, "captioner": by_captioner,
              "detector": report}
    if ctx.is_main:
        write_json(path, result)
    return result


def mode_detector(ctx: Context):
    """The run's nuisance-mode detector (trained once, ``<run>/modes/detector``) and its test-set report."""
    from ..data.datasets import load_fashion_mnist, to_model_range
    from ..evaluation.judge import copy_judge, fashion_mnist_train, load_judge, save_judge
    from ..evaluation.modes import DETECTOR_CLASSES, SHIPPED_DETECTOR, detector_report, train_mode_detector

    folder = ctx.run / "modes" / "detector"
    if not (folder / "classifier.json").is_file() and (SHIPPED_DETECTOR / "classifier.json").is_file():
        if ctx.is_main:
            folder.parent.mkdir(parents=True, exist_ok=True)
            copy_judge(SHIPPED_DETECTOR, folder)  # the shipped one, trained as below (scripts/ship_detectors.py)
        ctx.acc.wait_for_everyone()
    if not (folder / "classifier.json").is_file():
        ctx.log("training the nuisance-mode detector on the full Fashion-MNIST training set")
        images, _ = fashion_mnist_train(ctx.cfg.data.data_dir)
        model = train_mode_detector(images, epochs=MODE_DETECTOR_EPOCHS, show=ctx.show, accelerator=ctx.acc)
        if ctx.is_main:
            save_judge(model, folder, list(DETECTOR_CLASSES))
        ctx.acc.wait_for_everyone()
    detector = load_judge(folder, ctx.acc.device, name="mode detector")
    test, _ = load_fashion_mnist("test", ctx.cfg.data.data_dir)
    report = detector_report(detector, to_model_range(test))
    ctx.log(f"mode detector on the test set: accuracy {report['accuracy']:.3f}, clean images given a mode "
            f"{report['clean_false_alarm']:.3f}, recall " + ", ".join(f"{m} {r:.2f}" for m, r in report["recall"].items()))
    return detector, report


MODE_DETECTOR_EPOCHS = 3


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
    from ..evaluation.distribution import distribution_report, real_reference
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
        reference = None  # the real side (k-NN radii of 10k features, class statistics): once per seed
        for cond in conditions:
            store = ctx.run / f"seed_{seed}" / "mining" / cond.dirname / "synthetic"
            if not (store / "manifest.csv").is_file():
                continue
            fake_x, fake_y = ctx.source.synthetic_inputs(store)
            reference = reference or real_reference(real, real_y, len(ctx.source.class_names))
            report = distribution_report(real, real_y, extract(features, fake_x), fake_y, ctx.source.class_names,
                                         reference=reference)
            result["conditions"].setdefault(cond.text, {})[str(seed)] = report
    result["summary"] = {
        cond: {key: mean_std([r["overall"][key] for r in per_seed.values()]) for key in ("fid", "precision", "recall")}
        for cond, per_seed in result["conditions"].items()
    }
    if ctx.is_main:
        write_json(path, result)
    return result
