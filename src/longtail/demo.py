"""The embedded default, end to end: mine the longtail of a Fashion-MNIST-LT classifier on the CPU.

Stages (each resumes from the run directory):

1. generator: load the shipped small latent diffusion model (or train it if absent);
2. base: per seed, train a small CNN + Epistemic Head on the long-tailed subset; accuracy (Many/Medium/Few)
   and how well each signal detects rare and hard test images (AUROC, paper Figure 5);
3. sweep: signal and P(class) of generated images against the guidance weight (Figure 2), the weight chosen
   by the paper's rule (``longtail.calibrate``), guided vs unguided generation time, image grids;
4. mining: per seed, three conditions with the same synthetic count -- no synthetic data, unguided
   synthetic data, LTG synthetic data -- fine-tuned round by round (Figure 3);
5. summary: ``metrics.json``, a printed table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .calibrate import calibrate, save_grid
from .conditions import check_condition, condition_label, mean_std_cell
from .config import dump_config, to_dict
from .data.datasets import (
    FASHION_MNIST_CLASSES,
    class_groups,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
    to_model_range,
)
from .data.store import SyntheticStore
from .evaluation.distribution import distribution_report
from .evaluation.features import LayerFeatures, extract
from .evaluation.metrics import accuracy_report, detection_report, signal_scores
from .evaluation.trajectory import format_trajectory, trajectory_analysis
from .generate import Generated, generate, generate_dataset, gif_prompts, plan_jobs
from .heads import ClassifierOutput, EpistemicClassifier, HeadsOnly
from .mining import MiningConfig, load_state, mine, save_state
from .models.ldm import LatentDiffusion
from .models.tiny import ASSETS_DIR, TinyGeneratorConfig, class_prompt, load_tiny_generator, train_generator
from .pipelines import write_classifier_json
from .sampling import GuidanceConfig, initial_latents
from .train import SmallCNN, TrainConfig, fit, make_classifier, predict


@dataclass
class DataSection:
    data_dir: str | None = None
    n_max: int = 1000
    imbalance: float = 100.0
    data_seed: int = 0  # the long-tailed subset is fixed; run seeds vary training and generation
    many: int = 100
    few: int = 20


@dataclass
class ClassifierSection:
    width: int = 16
    heads: int = 5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=2e-3))
    heads_epochs: int = 6  # Epistemic Head training after the base is trained (heads start as its head)
    head_noise: float = 0.1  # head copies start at the trained head + this x std(weights) noise
    ensemble: int = 0  # > 0: also train this many independent classifiers (Figure 5's ensemble comparison)


@dataclass
class SamplerSection:
    num_steps: int = 20
    cfg_scale: float = 3.0
    batch_size: int = 100


@dataclass
class SweepSection:
    signals: list[str] = field(default_factory=lambda: ["entropy", "energy", "total", "epistemic"])
    weights: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    images_per_class: int = 8
    min_p_ratio: float = 0.5
    normalize: bool = False
    start: float = 0.0
    end: float = 1.0


@dataclass
class MiningSection:
    conditions: list[str] = field(default_factory=lambda: ["none", "unguided", "ltg"])
    signal: str = "total"
    weight: float | None = None  # None: the weight the sweep chose for `signal`
    rounds: int = 2
    images_per_round: int = 250
    allocation: str = "even"
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, lr=5e-4))


@dataclass
class IntrospectionSection:
    """Longtail Introspection (paper 4.3, A.2) on the first seed's base classifier."""

    images_per_class: int = 40  # guided and unguided images captioned per class (the paper: 100)
    keywords: int = 3  # K keywords per caption
    pairs: int = 10  # P (caption, keywords) pairs kept per class (the paper: 40)
    llm_url: str | None = None  # an OpenAI-compatible chat endpoint; None: the offline template
    llm_model: str = "default"
    # keep only keywords at least this far (1 - cosine) from every baseline word. With the MiniLM embedder the
    # same word in another caption lies 0.00-0.07 away and a word absent from the baseline 0.44-0.82 (measured on
    # configs/compare.yaml), so 0.3 keeps the words only the guided captions need; 0 is the paper's pure form.
    min_distance: float = 0.3


@dataclass
class DemoConfig:
    """Everything the demo does, sized for 2 CPU cores; ``--quick`` shrinks it (see ``quick_overrides``)."""

    out: str = "runs/demo"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    generator: str | None = None  # a trained generator directory; None: the shipped one (trained if absent)
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    trajectory: bool = True  # the A.7 trajectory analysis
    data: DataSection = field(default_factory=DataSection)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    mining: MiningSection = field(default_factory=MiningSection)
    introspection: IntrospectionSection = field(default_factory=IntrospectionSection)


def quick_overrides() -> dict:
    """A few-minute run: one seed, fewer epochs, a smaller sweep and mining volume."""
    return {
        "seeds": [0],
        "classifier": {"train": {"epochs": 12}},
        "sampler": {"num_steps": 12},
        "sweep": {"signals": ["entropy", "total"], "weights": [1.0], "images_per_class": 4},
        "mining": {"rounds": 1, "images_per_round": 100, "finetune": {"epochs": 2}},
    }


# --- helpers -------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def uint8_to_input(images: Tensor) -> Tensor:
    """Stored synthetic images uint8 ``[N, 32, 32]`` -> classifier input ``[N, 1, 32, 32]`` in [-1, 1]."""
    return images.float().unsqueeze(1) / 127.5 - 1.0


def ensure_generator(cfg: DemoConfig, log) -> LatentDiffusion:
    root = Path(cfg.generator) if cfg.generator else ASSETS_DIR
    if not (root / "longtail_generator.json").is_file():
        log(f"no generator at {root}: training one on full Fashion-MNIST (about an hour on 2 cores)")
        train_generator(root, TinyGeneratorConfig(), data_dir=cfg.data.data_dir, log=log)
    return load_tiny_generator(root)


@dataclass
class DemoData:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    counts: list[int]
    groups: list[str]


def load_demo_data(cfg: DemoConfig) -> DemoData:
    images, labels = load_fashion_mnist("train", cfg.data.data_dir)
    test_images, test_labels = load_fashion_mnist("test", cfg.data.data_dir)
    counts = longtail_counts(cfg.data.n_max, cfg.data.imbalance, len(FASHION_MNIST_CLASSES))
    idx = longtail_indices(labels, counts, cfg.data.data_seed)
    return DemoData(to_model_range(images[idx]), labels[idx], to_model_range(test_images), test_labels, counts,
                    class_groups(counts, cfg.data.many, cfg.data.few))


def evaluate_classifier(model, data: DemoData, detection: bool = False, scores_path: Path | None = None) -> dict:
    """Test-set accuracy (top-1, per class, Many/Medium/Few); with ``detection`` also signal AUROCs.

    ``scores_path`` saves every test example's signals, label and prediction (safetensors) for ROC curves.
    """
    out = predict(model, data.test_x)
    preds = out.logits.argmax(-1)
    report = accuracy_report(preds, data.test_y, data.groups)
    if detection:
        report["detection"] = detection_report(out, data.test_y, data.groups)
    if scores_path is not None:
        tensors = {f"signal/{k}": v.contiguous() for k, v in signal_scores(out).items()}
        tensors.update(labels=data.test_y.contiguous(), preds=preds.contiguous(),
                       rare=torch.tensor([data.groups[int(y)] == "few" for y in data.test_y]))
        save_file(tensors, str(scores_path))
    return report


# --- stages --------------------------------------------------------------------------------------------------


def stage_base(cfg: DemoConfig, data: DemoData, seed: int, run: Path, log, show: bool):
    """Train (or load) the seed's base classifier + heads; returns (model, metrics)."""
    model = make_classifier(len(FASHION_MNIST_CLASSES), cfg.classifier.width, cfg.classifier.heads, seed)
    base_dir = run / f"seed_{seed}" / "base"
    ckpt, metrics_path = base_dir / "classifier.safetensors", base_dir / "metrics.json"
    if ckpt.is_file() and metrics_path.is_file():
        load_state(model, ckpt)
        return model, _read_json(metrics_path)
    started = time.perf_counter()
    train_cfg = TrainConfig(**{**to_dict(cfg.classifier.train), "seed": seed})
    torch.manual_seed(seed)
    base = SmallCNN(1, len(FASHION_MNIST_CLASSES), cfg.classifier.width)
    fit(base, data.train_x, data.train_y, train_cfg, desc=f"base classifier (seed {seed})", show=show)
    # the Epistemic Head: K copies of the *trained* head (+ noise), trained with the oracle loss, base frozen
    model = EpistemicClassifier(base, cfg.classifier.heads, init_noise=cfg.classifier.head_noise, seed=seed)
    fit(HeadsOnly(model), data.train_x, data.train_y, replace(train_cfg, epochs=cfg.classifier.heads_epochs),
        desc=f"epistemic head (seed {seed})", show=show)
    base_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**evaluate_classifier(model, data, detection=True, scores_path=base_dir / "test_scores.safetensors"),
               "seconds": time.perf_counter() - started}
    if cfg.classifier.ensemble > 0:
        metrics["detection"].update(ensemble_detection(cfg, data, seed, show))
    save_state(model, ckpt)
    write_classifier_json(base_dir, "longtail.train:make_classifier", ckpt.name,
                          model_kwargs={"width": cfg.classifier.width, "num_heads": cfg.classifier.heads},
                          num_classes=len(FASHION_MNIST_CLASSES), class_names=list(FASHION_MNIST_CLASSES),
                          preprocess={"size": 32, "in_channels": 1})  # 32 px grayscale in [-1, 1]
    _write_json(metrics_path, metrics)
    log(f"seed {seed}: base classifier top-1 {metrics['top1']:.3f} (many {metrics['many']:.3f}, "
        f"medium {metrics['medium']:.3f}, few {metrics['few']:.3f})")
    return model, metrics


def ensemble_detection(cfg: DemoConfig, data: DemoData, seed: int, show: bool) -> dict[str, dict[str, float]]:
    """Detection by an independently trained ensemble of K classifiers (their logits stacked as K "heads")."""
    logits = []
    for k in range(cfg.classifier.ensemble):
        member_seed = 1000 * (seed + 1) + k
        member = make_classifier(len(FASHION_MNIST_CLASSES), cfg.classifier.width, cfg.classifier.heads, member_seed)
        fit(member, data.train_x, data.train_y, TrainConfig(**{**to_dict(cfg.classifier.train), "seed": member_seed}),
            desc=f"ensemble member {k} (seed {seed})", show=show)
        logits.append(predict(member, data.test_x).logits)
    stacked = torch.stack(logits, dim=1)  # [N, K, C]
    out = ClassifierOutput(logits=stacked.mean(dim=1), head_logits=stacked)
    report = detection_report(out, data.test_y, data.groups, names=["total", "aleatoric", "epistemic"])
    return {f"ensemble_{name}": values for name, values in report.items()}


def stage_sweep(cfg: DemoConfig, ldm: LatentDiffusion, model, run: Path, log, show: bool) -> dict:
    """Guidance sweep with the first seed's base classifier; picks the weight per signal by the paper's rule."""
    out_path = run / "sweep" / "sweep.json"
    cached = _read_json(out_path)
    if cached is not None:
        return cached
    sw = cfg.sweep
    jobs = plan_jobs([sw.images_per_class] * len(FASHION_MNIST_CLASSES),
                     lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]), base_seed=10_000)

    def generate_fn(guidance: GuidanceConfig | None) -> Generated:
        return generate(ldm, jobs, classifier=model, guidance=guidance, num_steps=cfg.sampler.num_steps,
                        cfg_scale=cfg.sampler.cfg_scale, batch_size=cfg.sampler.batch_size, show=show,
                        desc=f"sweep {guidance.signal} w={guidance.weight:g}" if guidance else "sweep unguided")

    result = calibrate(generate_fn, torch.tensor([j.class_id for j in jobs]), sw.signals, sw.weights, run / "sweep",
                       base=GuidanceConfig(normalize=sw.normalize, start=sw.start, end=sw.end),
                       min_p_ratio=sw.min_p_ratio, per_class_in_grid=min(2, sw.images_per_class), log=log)
    _write_json(out_path, result)
    return result


def ltg_weight(cfg: DemoConfig, sweep_result: dict, signal: str | None = None) -> float:
    """The guidance weight for ``signal`` (default ``mining.signal``): ``mining.weight`` if set for the mining
    signal, else the sweep's choice by the paper's rule (or the smallest swept weight when none passed)."""
    signal = signal or cfg.mining.signal
    if cfg.mining.weight is not None and signal == cfg.mining.signal:
        return cfg.mining.weight
    choice = sweep_result["choices"].get(signal)
    if choice is None:
        raise ValueError(f"signal {signal!r} was not swept; add it to sweep.signals or set mining.weight")
    if choice["weight"] is None:
        return min(w for w in cfg.sweep.weights if w > 0)
    return float(choice["weight"])


def condition_guidance(cfg: DemoConfig, cond: str, sweep_result: dict) -> tuple[str, float] | None:
    """(signal, weight) of a guided condition: ``ltg`` / ``naive`` use ``mining.signal`` at its chosen weight,
    ``ltg:<signal>`` that signal at its chosen weight, ``ltg:<signal>@<w>`` an explicit weight (ablations)."""
    if cond in ("ltg", "naive"):
        return cfg.mining.signal, ltg_weight(cfg, sweep_result)
    if cond.startswith("ltg:"):
        signal, _, weight = cond[4:].partition("@")
        return signal, float(weight) if weight else ltg_weight(cfg, sweep_result, signal)
    return None


def stage_trajectory(cfg: DemoConfig, ldm: LatentDiffusion, model, data: DemoData, weight: float, run: Path,
                     log) -> dict:
    """A.7: FID of decoded predicted-clean vs decoded noisy latents along the steps; signal at w=0 vs w."""
    path = run / "trajectory.json"
    cached = _read_json(path)
    if cached is not None:
        return cached
    per_class = max(2, cfg.sweep.images_per_class)
    jobs = plan_jobs([per_class] * len(FASHION_MNIST_CLASSES), lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]),
                     base_seed=20_000)
    features = LayerFeatures(model)
    real = extract(features, data.test_x[:2000])
    cond = ldm.encode_prompts([j.prompt for j in jobs])
    uncond = ldm.encode_prompts([""] * len(jobs))
    latents = initial_latents([j.seed for j in jobs], ldm.latent_shape)
    guidance = GuidanceConfig(cfg.mining.signal, weight, start=cfg.sweep.start, end=cfg.sweep.end,
                              normalize=cfg.sweep.normalize)
    rows = trajectory_analysis(ldm.denoise, ldm.scheduler, ldm.decode, cond, latents, features, real, model,
                               guidance, uncond=uncond, cfg_scale=cfg.sampler.cfg_scale,
                               num_steps=cfg.sampler.num_steps)
    result = {"signal": cfg.mining.signal, "weight": weight, "images": len(jobs), "rows": rows}
    _write_json(path, result)
    log(format_trajectory(rows, weight))
    return result


def stage_distribution(cfg: DemoConfig, data: DemoData, run: Path) -> dict:
    """FID / precision / recall of each condition's synthetic images vs real test images (per seed), on the
    seed's base-classifier features, with the paper's between-class real reference."""
    path = run / "distribution.json"
    cached = _read_json(path)
    if cached is not None:
        return cached
    result: dict[str, dict] = {"features": "base classifier, input of its head", "conditions": {}}
    for seed in cfg.seeds:
        model = make_classifier(len(FASHION_MNIST_CLASSES), cfg.classifier.width, cfg.classifier.heads, seed)
        load_state(model, run / f"seed_{seed}" / "base" / "classifier.safetensors")
        features = LayerFeatures(model)
        real = extract(features, data.test_x)
        for cond in cfg.mining.conditions:
            store = SyntheticStore(run / f"seed_{seed}" / "mining" / cond / "synthetic")
            if not store.manifest.is_file():
                continue
            images, labels = store.load(FASHION_MNIST_CLASSES)
            fake = extract(features, uint8_to_input(torch.from_numpy(images)))
            report = distribution_report(real, data.test_y, fake, torch.from_numpy(labels), FASHION_MNIST_CLASSES)
            result["conditions"].setdefault(cond, {})[str(seed)] = report
    result["summary"] = {
        cond: {key: _mean_std([r["overall"][key] for r in per_seed.values()]) for key in ("fid", "precision", "recall")}
        for cond, per_seed in result["conditions"].items()
    }
    _write_json(path, result)
    return result


def stage_introspection(cfg: DemoConfig, ldm: LatentDiffusion, model, weight: float, run: Path, log,
                        show: bool) -> dict[str, list[str]]:
    """Caption guided vs unguided images per class, mine longtail keywords, turn them into prompts.

    Writes ``introspection/{keywords,class_keywords,prompts}.json`` and example pairs per class; returns the
    refined prompts per class name. Resumes from ``prompts.json``.
    """
    from .introspection import (
        AttributeCaptioner,
        TransformersTokenEmbedder,
        class_keywords,
        make_chat_fn,
        mine_keywords,
        refine_prompts,
        save_prompts,
    )
    from .introspection.prompts import prompt_texts

    out = run / "introspection"
    if (out / "prompts.json").is_file():
        return json.loads((out / "prompts.json").read_text())
    ic = cfg.introspection
    jobs = plan_jobs([ic.images_per_class] * len(FASHION_MNIST_CLASSES),
                     lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]), base_seed=30_000)
    kw = dict(classifier=model, num_steps=cfg.sampler.num_steps, cfg_scale=cfg.sampler.cfg_scale,
              batch_size=cfg.sampler.batch_size, show=show)
    guidance = GuidanceConfig(cfg.mining.signal, weight, start=cfg.sweep.start, end=cfg.sweep.end,
                              normalize=cfg.sweep.normalize)
    guided = generate(ldm, jobs, guidance=guidance, desc="introspection: guided", **kw)
    plain = generate(ldm, jobs, desc="introspection: unguided", **kw)
    names = [FASHION_MNIST_CLASSES[j.class_id] for j in jobs]
    captioner = AttributeCaptioner()
    guided_caps, plain_caps = captioner.caption(guided.images, names), captioner.caption(plain.images, names)
    embedder = TransformersTokenEmbedder()
    backend = make_chat_fn(ic.llm_url, ic.llm_model) if ic.llm_url else "template"
    keywords, stats, prompts, errors = {}, {}, {}, {}
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        idx = [i for i, j in enumerate(jobs) if j.class_id == c]
        pairs = mine_keywords([guided_caps[i] for i in idx], [plain_caps[i] for i in idx], name, embedder,
                              k=ic.keywords, pairs=ic.pairs, min_distance=ic.min_distance)
        keywords[name] = [p.to_dict() for p in pairs]
        stats[name] = [{"word": k.word, "count": k.count, "mean_distance": k.mean_distance}
                       for k in class_keywords(pairs)]
        refined = refine_prompts(pairs, name, backend=backend)
        prompts[name] = prompt_texts(refined, unique=True) or [class_prompt(name)]
        errors[name] = [r.error for r in refined if r.error]
        top = ", ".join(f"{k['word']} ({k['count']})" for k in stats[name][:4])
        log(f"  {name:<11} keywords: {top or '-'}; e.g. {prompts[name][0]!r}")
        save_grid({0.0: plain.images[idx[:4]], 1.0: guided.images[idx[:4]]}, torch.zeros(min(4, len(idx)), dtype=torch.long),
                  out / "examples" / f"{name.replace(' ', '_')}.png", per_class=min(4, len(idx)))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "keywords.json", keywords)
    _write_json(out / "class_keywords.json", stats)
    _write_json(out / "captions.json", {"guided": guided_caps, "unguided": plain_caps,
                                        "classes": [j.class_id for j in jobs]})
    if any(errors.values()):
        _write_json(out / "errors.json", errors)
    save_prompts(out / "prompts.json", prompts)
    return prompts


def stage_mining(cfg: DemoConfig, ldm: LatentDiffusion, data: DemoData, seed: int, condition: str,
                 sweep_result: dict, run: Path, show: bool, prompts: dict[str, list[str]] | None = None) -> list[dict]:
    """One condition of the comparison for one seed, from the seed's base classifier (resumable).

    ``none``: fine-tune on real data only; ``unguided``: + synthetic "a photo of a <class>" images;
    ``gif``: + synthetic images from GIF's 40 prompt templates; ``ltg``: + Longtail-Guided images (predicted
    clean state; ``ltg:<signal>`` with that signal); ``naive``: + images guided on the decoded noisy state (the A.7 ablation); ``introspect``:
    + unguided images from the refined introspection prompts (``prompts``, cycled per class);
    ``aug:<name>``: real data with that augmentation baseline. Same synthetic count for every generator.
    """
    check_condition(condition)
    model = make_classifier(len(FASHION_MNIST_CLASSES), cfg.classifier.width, cfg.classifier.heads, seed)
    load_state(model, run / f"seed_{seed}" / "base" / "classifier.safetensors")
    guidance = None
    guided = condition_guidance(cfg, condition, sweep_result)
    if guided is not None:
        guidance = GuidanceConfig(guided[0], guided[1], start=cfg.sweep.start, end=cfg.sweep.end,
                                  normalize=cfg.sweep.normalize, on_noisy=condition == "naive")
    if condition in ("gif", "introspect"):
        if condition == "introspect" and not prompts:
            raise ValueError("the introspect condition needs the introspection stage's prompts")
        table = [gif_prompts(name) if condition == "gif" else prompts[name] for name in FASHION_MNIST_CLASSES]

        def prompt(c: int, i: int) -> str:
            return table[c][i % len(table[c])]
    else:
        def prompt(c: int, i: int) -> str:
            return class_prompt(FASHION_MNIST_CLASSES[c])

    synthetic = condition not in ("none",) and not condition.startswith("aug:")
    meta = {"weight": guidance.weight if guidance is not None else 0.0, "model": "embedded tiny-ldm",
            "num_steps": cfg.sampler.num_steps, "cfg_scale": cfg.sampler.cfg_scale}

    def synthesize(r: int, clf, counts: list[int], store: SyntheticStore) -> None:
        start = [(r - 1) * n for n in counts]  # each round continues the class's indices
        jobs = plan_jobs(counts, prompt, base_seed=seed, start=start)
        generate_dataset(ldm, jobs, store.root, FASHION_MNIST_CLASSES, meta={**meta, "round": r}, prefix=f"r{r}_",
                         chunk=cfg.sampler.batch_size, show=show, classifier=clf, guidance=guidance,
                         num_steps=cfg.sampler.num_steps, cfg_scale=cfg.sampler.cfg_scale,
                         batch_size=cfg.sampler.batch_size,
                         record_signal=guidance.signal if guidance else cfg.mining.signal,
                         desc=f"{condition} r{r} (seed {seed})")

    augment = condition[4:] if condition.startswith("aug:") else cfg.mining.finetune.augment
    recipe = TrainConfig(**{**to_dict(cfg.mining.finetune), "augment": augment})
    store_dir = run / f"seed_{seed}" / "mining" / condition / "synthetic"

    def finetune(clf, rows: list[dict[str, str]], r: int) -> list[float]:
        x, y = data.train_x, data.train_y
        if rows:
            images, labels = SyntheticStore(store_dir).load(FASHION_MNIST_CLASSES, ids=[row["id"] for row in rows])
            x = torch.cat([x, uint8_to_input(torch.from_numpy(images))])
            y = torch.cat([y, torch.from_numpy(labels)])
        return fit(clf, x, y, replace(recipe, seed=seed * 1000 + r), desc=f"fine-tune {condition} r{r}", show=show)

    mcfg = MiningConfig(rounds=cfg.mining.rounds, images_per_round=cfg.mining.images_per_round,
                        allocation=cfg.mining.allocation)
    return mine(model, synthesize if synthetic else None, finetune, lambda m: evaluate_classifier(m, data), mcfg,
                data.counts, run / f"seed_{seed}" / "mining" / condition)


def _mean_std(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(cfg: DemoConfig, data: DemoData, base: dict[int, dict], mining: dict[int, dict[str, list[dict]]],
              sweep_result: dict, weight: float) -> dict:
    conditions = {}
    for cond in cfg.mining.conditions:
        finals = [mining[s][cond][-1] for s in cfg.seeds]
        conditions[cond] = {k: _mean_std([f[k] for f in finals]) for k in ("top1", "many", "medium", "few")}
    detection = {}
    for name in next(iter(base.values()))["detection"]:
        detection[name] = {k: _mean_std([base[s]["detection"][name][k] for s in cfg.seeds])
                           for k in ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")}
    return {
        "seeds": cfg.seeds,
        "class_names": list(FASHION_MNIST_CLASSES),
        "train_counts": data.counts,
        "groups": data.groups,
        "base": {k: _mean_std([base[s][k] for s in cfg.seeds]) for k in ("top1", "many", "medium", "few")},
        "detection": detection,
        "sweep": sweep_result,
        "ltg": {"signal": cfg.mining.signal, "weight": weight},
        "condition_guidance": {c: {"signal": g[0], "weight": g[1]} for c in cfg.mining.conditions
                               if (g := condition_guidance(cfg, c, sweep_result)) is not None},
        "conditions": conditions,
        "per_seed": {str(s): {"base": base[s], "mining": mining[s]} for s in cfg.seeds},
    }


def format_summary(summary: dict) -> str:
    """The printed table: accuracy per condition (mean ± std over seeds), detection AUROCs, timing."""
    keys = ("top1", "many", "medium", "few")
    lines = [f"Fashion-MNIST-LT test set (10k, balanced); mean ± std over seeds {summary['seeds']}", ""]
    lines.append(f"{'condition':<26}" + "".join(f"{k:>14}" for k in ("top-1", "many", "medium", "few")))
    lines.append(f"{'base (LT real only)':<26}" + "".join(mean_std_cell(summary["base"][k]) for k in keys))
    for cond, m in summary["conditions"].items():
        label = condition_label(cond, summary.get("condition_guidance", {}).get(cond))
        lines.append(f"{label:<26}" + "".join(mean_std_cell(m[k]) for k in keys))
    lines += ["", f"{'signal':<20}" + "".join(f"{k:>14}" for k in ("AUROC rare", "AUROC hard", "acc > q90",
                                                                     "acc < q90"))]
    for name, d in summary["detection"].items():
        lines.append(f"{name:<20}" + "".join(mean_std_cell(d[k]) for k in ("auroc_rare", "auroc_hard", "acc_above_q90",
                                                                      "acc_below_q90")))
    if summary.get("distribution"):
        lines += ["", f"{'synthetic vs real':<26}" + "".join(f"{k:>14}" for k in ("FID", "precision", "recall"))]
        for cond, d in summary["distribution"].items():
            label = condition_label(cond, summary.get("condition_guidance", {}).get(cond))
            lines.append(f"{label:<26}" + "".join(mean_std_cell(d[k]) for k in ("fid", "precision", "recall")))
    t = summary["sweep"]["timing"]
    lines += ["", f"generation: unguided {t['unguided_img_per_s']:.1f} img/s, guided {t['guided_img_per_s']:.1f} "
              f"img/s ({t['slowdown']:.1f}x slower)"]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, show: bool = True, log=print) -> dict:
    """Run (or resume) every stage; returns the summary also written to ``<out>/metrics.json``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    for cond in cfg.mining.conditions:
        check_condition(cond)
    started = time.perf_counter()
    ldm = ensure_generator(cfg, log)
    data = load_demo_data(cfg)
    log(f"long-tailed training set: {sum(data.counts)} images, per class {data.counts}")
    base, models = {}, {}
    for seed in cfg.seeds:
        models[seed], base[seed] = stage_base(cfg, data, seed, run, log, show)
    sweep_result = stage_sweep(cfg, ldm, models[cfg.seeds[0]], run, log, show)
    weight = ltg_weight(cfg, sweep_result)
    prompts = None
    if "introspect" in cfg.mining.conditions:
        log("longtail introspection (keywords of guided vs unguided captions):")
        prompts = stage_introspection(cfg, ldm, models[cfg.seeds[0]], weight, run, log, show)
    mining: dict[int, dict[str, list[dict]]] = {}
    for seed in cfg.seeds:
        mining[seed] = {}
        for cond in cfg.mining.conditions:
            mining[seed][cond] = stage_mining(cfg, ldm, data, seed, cond, sweep_result, run, show, prompts)
            final = mining[seed][cond][-1]
            log(f"seed {seed} {cond:9s}: top-1 {final['top1']:.3f}  few {final['few']:.3f}")
    summary = summarize(cfg, data, base, mining, sweep_result, weight)
    if cfg.trajectory:
        summary["trajectory"] = stage_trajectory(cfg, ldm, models[cfg.seeds[0]], data, weight, run, log)
    summary["distribution"] = stage_distribution(cfg, data, run)["summary"]
    summary["seconds"] = time.perf_counter() - started
    _write_json(run / "metrics.json", summary)
    table = format_summary(summary)
    (run / "summary.txt").write_text(table + "\n")
    log(table)
    from .report import write_report

    log(f"report: {write_report(run)}")
    return summary
