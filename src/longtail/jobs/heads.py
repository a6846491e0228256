"""Epistemic Head jobs: ``longtail heads train`` and ``longtail heads overhead``.

``run_heads_train`` attaches an Epistemic Head to a user's trained classifier and trains only the heads on an
ImageFolder (the routine ``longtail mine`` uses, ``stages.train_heads``: base frozen behind a stop-gradient, in
eval mode, out of the optimizer), checks that the base weights are bit-identical afterwards, and writes to
``OUT``:

* ``heads.safetensors`` -- the head weights, written by ``EpistemicClassifier.save_heads`` (the file ``--heads``
  and ``load_classifier(heads=...)`` read);
* ``classifier.json`` (+ ``class_names.json``) -- base classifier and heads together, for ``--classifier
  OUT/classifier.json`` in any other command;
* ``heads.json`` -- the training settings and the base weights' digest;
* with a validation folder, ``report.json`` -- accuracy and, per signal, AUROC for misclassified (hard) and
  rare examples and the accuracy above vs below the signal's 90% quantile (``evaluation.metrics``).

``time_overhead`` measures what K heads add to a forward and a forward + backward pass of an architecture
(random weights and input, nothing downloaded); ``run_heads_overhead`` prints it with the parameter overhead.
"""

from __future__ import annotations

import copy
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..data.datasets import DataError
from ..heads import HEAD_INITS, EpistemicClassifier, find_head, oracle_loss, parameter_overhead
from ..models.classifiers import LoadedClassifier
from ..outputs import as_output
from .common import ClassifierSpec, load_classifier_spec, resolve_classifier_spec, write_classifier_json
from .mine_config import FinetuneSpec, HeadsSpec

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..data.imagefolder import ImageIndex
    from ..data.sources import ImageFolderSource

Log = Callable[[str], None]

HEADS_FILE = "heads.safetensors"
OUTPUT_FILES = (HEADS_FILE, "classifier.json", "class_names.json", "heads.json", "report.json")
"""What ``run_heads_train`` writes into ``OUT``; any of them there already is refused without ``overwrite``."""

REPORT_SIGNALS = ("entropy", "energy", "total", "aleatoric", "epistemic")


@dataclass
class HeadsTrainConfig:
    """``longtail heads train``: which classifier, which data, which heads, where to write.

    ``classifier``: the trained classifier (``spec`` / ``checkpoint`` / ``num_classes`` / ``class_names`` /
    ``head_name``; a ``classifier.json`` works; heads it lists are ignored, new ones are trained). ``data``:
    the training ImageFolder; ``val``: an optional validation ImageFolder for the detection report.
    ``heads``: K (``num_heads``), ``epochs``, ``lr``, ``init``, the relaxed oracle loss's ``epsilon`` and
    ``bootstrap`` (``HeadsSpec``). ``batch_size``: images per step. ``image_size``: replaces the classifier's input
    side (images are resized and center-cropped to it; its normalisation stays); needed when its preprocessing
    gives none.
    """

    classifier: ClassifierSpec
    data: str
    out: str
    val: str | None = None
    heads: HeadsSpec = field(default_factory=lambda: HeadsSpec(epochs=5))
    batch_size: int = 128
    image_size: int | None = None
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


# --- checks (all before anything is trained or written) ------------------------------------------------------


def check_heads_config(cfg: HeadsTrainConfig) -> None:
    """Raise ``ConfigError`` naming the option (``--num-heads`` ...) for a value the training cannot use:
    K < 2, epsilon outside [0, 1] (as ``mine``'s ``heads.epsilon``), epochs / batch size / image size < 1, lr <= 0, an unknown init."""
    hs = cfg.heads
    if not isinstance(hs.num_heads, int) or hs.num_heads < 2:
        raise ConfigError(f"--num-heads must be at least 2 (heads can only disagree if there are two), "
                          f"got {hs.num_heads!r}")
    if not (isinstance(hs.epsilon, int | float) and 0.0 <= hs.epsilon <= 1.0):
        raise ConfigError(f"--epsilon must lie in [0, 1] (the losing heads' share of the relaxed oracle loss), "
                          f"got {hs.epsilon!r}")
    if hs.init not in HEAD_INITS:
        raise ConfigError(f"--init must be one of {', '.join(HEAD_INITS)}, got {hs.init!r}")
    for flag, value in (("--epochs", hs.epochs), ("--batch-size", cfg.batch_size), ("--image-size", cfg.image_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if not hs.lr > 0:
        raise ConfigError(f"--lr must be positive, got {hs.lr!r}")


def check_out(out: str | Path, overwrite: bool) -> Path:
    """The output directory ``out``, checked: ``ConfigError`` naming ``--out`` when it exists as something
    other than a directory, or holds outputs of an earlier run (``OUTPUT_FILES``) and ``overwrite`` is off."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a directory; give a directory for the heads")
    held = [name for name in OUTPUT_FILES if (path / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"--out {path} already holds {', '.join(held)}; pass --overwrite to replace them, or "
                          "choose another directory (nothing was written)")
    return path


def load_base(cfg: HeadsTrainConfig, device: torch.device) -> tuple[LoadedClassifier, ClassifierSpec]:
    """The base classifier without heads (a ``classifier.json`` expanded) and its resolved spec.

    ``image_size`` replaces the input size (resize + center crop to it). Raises ``ConfigError`` naming
    ``--head-name`` when no linear head is found, or ``--image-size`` when the input size is unknown."""
    cs = replace(resolve_classifier_spec(cfg.classifier), heads=None, num_heads=None)
    loaded = load_classifier_spec(cs, device)
    try:
        find_head(loaded.model, cs.head_name)
    except ValueError as err:
        raise ConfigError(f"--classifier {cfg.classifier.spec}: {err} (--head-name)") from None
    if cfg.image_size is not None:
        loaded.bridge = replace(loaded.bridge, size=(cfg.image_size, cfg.image_size), resize=None)
    if loaded.bridge.size is None and not isinstance(loaded.bridge.resize, int):
        raise ConfigError(f"the input size of classifier {cs.spec} is unknown: pass --image-size (or a "
                          "classifier.json whose preprocess gives size)")
    return loaded, cs


def untrained_base(cs: ClassifierSpec) -> bool:
    """True when the base classifier comes from a torchvision or ``timm:`` name with no checkpoint: those are
    built with random weights here (nothing is downloaded). Entry points (``module:callable``) and other specs
    may load their own weights, so they are not flagged."""
    spec = cs.spec or ""
    return cs.checkpoint is None and (spec.startswith("timm:") or (":" not in spec and "/" not in spec
                                                                    and not spec.endswith(".json")))


def scan_data(root: str, flag: str, class_names: list[str] | None, num_classes: int | None) -> ImageIndex:
    """``scan_imagefolder(root)`` matched to the classifier (by name, else by count); a ``DataError`` is
    re-raised with ``flag`` (``--data`` / ``--val``) in front."""
    from ..data.imagefolder import scan_imagefolder

    try:
        return scan_imagefolder(root, class_names, num_classes=None if class_names else num_classes)
    except DataError as err:
        raise DataError(f"{flag}: {err}") from None


# --- training ----------------------------------------------------------------------------------------------


def state_digest(module: nn.Module) -> str:
    """SHA-256 (hex) of every parameter and buffer of ``module``, bytes and names: equal exactly when the
    state is bit-identical."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _accelerator(device: str) -> Accelerator:
    from accelerate import Accelerator, DataLoaderConfiguration

    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))


def _save_heads(model: EpistemicClassifier, out: Path) -> Path:
    """``save_heads`` to a temporary name, then renamed into place: never a half-written heads file."""
    target = out / HEADS_FILE
    tmp = out / f".{HEADS_FILE}.{os.getpid()}.tmp"
    model.save_heads(tmp)
    tmp.replace(target)
    return target


def run_heads_train(cfg: HeadsTrainConfig, show: bool = True, log: Log = print) -> dict:
    """Train an Epistemic Head on ``cfg.classifier`` with ``cfg.data``; write ``OUTPUT_FILES`` to ``cfg.out``.

    Returns ``{"heads": path, "classifier": path, "report": dict | None}``. Raises ``ConfigError`` for bad
    options or ``--out`` (``check_heads_config``, ``check_out``), ``DataError`` for a missing folder or class
    folders that do not match the classifier's classes / class count (naming ``--data`` / ``--val``), and
    ``RuntimeError`` if the base weights changed (they cannot: the heads train behind a stop-grad).
    """
    from ..data.sources import ImageFolderSource
    from .stages import preprocess_for, train_heads

    check_heads_config(cfg)
    out = check_out(cfg.out, cfg.overwrite)
    started = time.perf_counter()
    acc = _accelerator(cfg.device)
    loaded, cs = load_base(cfg, acc.device)
    if untrained_base(cs):
        log(f"warning: --classifier {cs.spec} has no --checkpoint, so its weights are the architecture's fresh "
            "random initialisation; heads on an untrained network measure nothing useful (give the trained "
            "weights with --checkpoint)")
    train = scan_data(cfg.data, "--data", loaded.class_names, loaded.num_classes)
    val = scan_data(cfg.val, "--val", train.class_names, None) if cfg.val else None
    source = ImageFolderSource(train, val or train, preprocess_for(loaded), eval_name=f"--val {cfg.val}")
    log(f"{cs.spec}: training {cfg.heads.num_heads} heads for {cfg.heads.epochs} epochs on {cfg.data} "
        f"({source.describe()}), base frozen")
    before = state_digest(loaded.model)
    recipe = FinetuneSpec(batch_size=cfg.batch_size, lr=cfg.heads.lr)
    wrapped = train_heads(loaded.model, cfg.heads, source, recipe, accelerator=acc, seed=cfg.seed,
                          head_name=cs.head_name, show=show)
    if state_digest(wrapped.base) != before:
        raise RuntimeError("the base classifier's weights changed while training the heads; nothing was written")
    report = validation_report(wrapped, source, acc, cfg.val) if val is not None else None  # every process
    heads_path, clf_json = out / HEADS_FILE, out / "classifier.json"
    if acc.is_main_process:
        write_outputs(cfg, out, wrapped, loaded, cs, source.class_names, report,
                      {"train_images": len(train.paths), "base_sha256": before, "base_unchanged": True,
                       "seconds": time.perf_counter() - started})
    acc.wait_for_everyone()
    log(f"{heads_path}: {cfg.heads.num_heads} heads (base weights unchanged); load with --classifier {clf_json}")
    if report is not None:
        log(detection_table(report))
        log(f"{out / 'report.json'}")
    return {"heads": str(heads_path), "classifier": str(clf_json), "report": report}


def write_outputs(cfg: HeadsTrainConfig, out: Path, wrapped: EpistemicClassifier, loaded: LoadedClassifier,
                  cs: ClassifierSpec, class_names: list[str], report: dict | None, facts: dict) -> None:
    """Write ``OUTPUT_FILES`` into ``out``: the heads (``save_heads``, renamed into place), ``classifier.json``
    (+ ``class_names.json``), ``heads.json`` (the settings and ``facts``), ``report.json`` when there is a
    ``report`` (else an old one is removed: it would describe other heads)."""
    from ..files import write_json

    out.mkdir(parents=True, exist_ok=True)
    _save_heads(wrapped, out)
    preprocess = loaded.bridge.to_dict() if cfg.image_size is not None else cs.preprocess
    checkpoint = str(Path(cs.checkpoint).resolve()) if cs.checkpoint else None
    write_classifier_json(out, cs.spec, checkpoint, model_kwargs=cs.model_kwargs, num_classes=len(class_names),
                          class_names=class_names, preprocess=preprocess, heads=HEADS_FILE,
                          num_heads=cfg.heads.num_heads, head_name=wrapped.head_name)
    hs = cfg.heads
    write_json(out / "heads.json", {
        "classifier": cs.spec, "checkpoint": checkpoint, "data": str(Path(cfg.data).resolve()),
        "num_heads": hs.num_heads, "epochs": hs.epochs, "lr": hs.lr, "batch_size": cfg.batch_size, "init": hs.init,
        "init_noise": hs.init_noise, "epsilon": hs.epsilon, "bootstrap": hs.bootstrap, "seed": cfg.seed,
        "head_name": wrapped.head_name, **facts})
    if report is not None:
        write_json(out / "report.json", report)
    elif (out / "report.json").exists():
        (out / "report.json").unlink()


# --- the detection report ----------------------------------------------------------------------------------


def validation_report(model: nn.Module, source: ImageFolderSource, accelerator: Accelerator, val: str
                      ) -> dict:
    """Accuracy (top-1, per class, Many / Medium / Few by the training counts) and ``detection_report`` (per
    signal: ``auroc_hard``, ``auroc_rare``, ``acc_above_q90``, ``acc_below_q90``) on ``source``'s evaluation
    split."""
    from ..evaluation.metrics import accuracy_report, detection_report
    from ..train import predict_loader

    out, labels = predict_loader(model, source.eval_loader(), accelerator)
    report = accuracy_report(out.logits.argmax(-1), labels, source.groups)
    return {"val": str(Path(val).resolve()), "num_images": len(labels), **report,
            "detection": detection_report(out, labels, source.groups, names=REPORT_SIGNALS)}


def detection_table(report: dict) -> str:
    """The detection part of a ``validation_report`` as plain text, one row per signal, as ``longtail evaluate``
    prints it: an undefined figure is ``n/a``, with its reason below the table."""
    from ..evaluation.stats import number_cell as cell

    lines = [f"validation {report['val']}: {report['num_images']} images, top-1 {cell(report['top1'], 4)} "
             "(hard = misclassified, rare = a Few class, q90 = the signal's 90% quantile)",
             f"{'signal':<12}{'AUROC hard':>12}{'AUROC rare':>12}{'acc >= q90':>12}{'acc < q90':>12}"]
    for name, d in report["detection"].items():
        lines.append(f"{name:<12}" + "".join(cell(d[k], width=12) for k in ("auroc_hard", "auroc_rare",
                                                                            "acc_above_q90", "acc_below_q90")))
    reasons = {f"{k.removesuffix('_reason')}: {v}" for d in report["detection"].values() for k, v in d.items()
               if k.endswith("_reason")}
    return "\n".join([*lines, *(f"  n/a {reason}" for reason in sorted(reasons))])


# --- overhead ------------------------------------------------------------------------------------------------


def input_shape(arch: str, model: nn.Module, image_size: int | None = None) -> tuple[int, int, int]:
    """``(channels, H, W)`` an architecture reads: ``image_size`` if given, else its default preprocessing's
    (``default_bridge``). Raises ``ConfigError`` naming ``--image-size`` when neither says."""
    from ..models.classifiers import default_bridge, input_channels

    bridge = default_bridge(arch, model)
    channels = bridge.in_channels or input_channels(model) or 3
    if image_size is not None:
        return channels, image_size, image_size
    if bridge.size is None:
        raise ConfigError(f"the input size of {arch} is unknown: pass --image-size")
    return channels, *bridge.size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """Inference: eval mode, no graph."""

    def run() -> None:
        model.eval()
        with torch.no_grad():
            as_output(model(x))

    return run


def _train_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """A training step's compute: train mode, cross-entropy on the base logits (+ the oracle loss on the head
    logits, as ``fit`` adds it), backward to every parameter."""

    def run() -> None:
        model.train()
        out = as_output(model(x))
        loss = F.cross_entropy(out.logits, y)
        if out.head_logits is not None:
            loss = loss + oracle_loss(out.head_logits, y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def time_overhead(model: nn.Module, num_heads: int, shape: tuple[int, int, int], *, batch_size: int = 8,
                  head_name: str | None = None, device: str | torch.device = "cpu", warmup: int = 1,
                  repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Wall time of ``model`` vs ``EpistemicClassifier(copy of model, num_heads)`` on random input
    ``[batch_size, *shape]``: a forward pass (eval, no grad) and a training step's forward + backward.

    ``warmup`` untimed rounds, then ``repeats`` timed ones, base and heads alternating (which goes first
    alternates too, so drift hits both alike); medians in milliseconds. Returns ``{"forward_base_ms",
    "forward_heads_ms", "forward_ratio", "backward_base_ms", "backward_heads_ms", "backward_ratio"}`` (the
    ``backward_*`` figures are forward + backward; ratio = heads / base). Raises ``ValueError`` for
    ``batch_size``, ``repeats`` < 1 or ``warmup`` < 0, or when no linear head is found.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch_size and repeats must be >= 1 and warmup >= 0, got {batch_size}, {repeats}, "
                         f"{warmup}")
    dev = torch.device(device)
    heads = EpistemicClassifier(copy.deepcopy(model), num_heads, head_name).to(dev)  # the copy carries the hook
    base = model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *shape), generator=gen).to(dev)
    y = torch.randint(0, heads.num_classes, (batch_size,), generator=gen).to(dev)
    runs = {"forward": (_forward(base, x), _forward(heads, x)),
            "backward": (_train_step(base, x, y), _train_step(heads, x, y))}
    times: dict[str, list[float]] = {f"{k}_{m}": [] for k in runs for m in ("base", "heads")}
    for i in range(warmup + repeats):
        for kind, pair in runs.items():
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for j in order:
                seconds = _timed(pair[j], dev)
                if i >= warmup:
                    times[f"{kind}_{('base', 'heads')[j]}"].append(seconds)
    stats: dict[str, float] = {}
    for kind in runs:
        b, h = (1000 * statistics.median(times[f"{kind}_{m}"]) for m in ("base", "heads"))
        stats.update({f"{kind}_base_ms": b, f"{kind}_heads_ms": h, f"{kind}_ratio": h / b})
    return stats


def overhead_lines(arch: str, num_heads: int, params: dict[str, float], timing: dict[str, float] | None = None,
                   setting: str = "") -> list[str]:
    """What ``longtail heads overhead`` prints: parameters, then (with ``timing``) the time ratios with the
    milliseconds beside them; the last line holds the overhead with the parameter percentage last."""
    extra = params["added_with_bias"] - params["added_params"]
    lines = [f"architecture {arch}: C={params['num_classes']} classes, d_model={params['d_model']}, K={num_heads} heads",
             f"base parameters:  {params['base_params']:,}",
             f"added parameters: {params['added_params']:,} (K x d x C) + {extra:,} biases"]
    if timing is None:
        return [*lines, f"overhead: {params['percent']:.2f}%"]
    pct = {k: 100 * (timing[f"{k}_ratio"] - 1) for k in ("forward", "backward")}
    lines.append(f"time, with heads vs base ({setting}):")
    for kind, label in (("forward", "forward"), ("backward", "forward+backward")):
        lines.append(f"  {label:<17} x{timing[f'{kind}_ratio']:.3f} ({pct[kind]:+.1f}%)   base "
                     f"{timing[f'{kind}_base_ms']:.2f} ms, with heads {timing[f'{kind}_heads_ms']:.2f} ms")
    return [*lines, f"overhead: time {pct['forward']:+.1f}% forward, {pct['backward']:+.1f}% forward+backward; "
                    f"parameters {params['percent']:.2f}%"]


def run_heads_overhead(arch: str, num_classes: int, num_heads: int, head_name: str | None = None, *,
                       measure_time: bool = True, batch_size: int = 8, image_size: int | None = None,
                       repeats: int = 3, warmup: int = 1, device: str = "cpu", log: Log = print) -> dict:
    """Parameter overhead of ``num_heads`` heads on ``arch`` (random weights, nothing downloaded) and, with
    ``measure_time``, ``time_overhead`` at ``batch_size`` on the architecture's input size; printed through
    ``log`` (``overhead_lines``). Returns ``{"arch", "num_heads", "params": ..., "time": ... | None,
    "time_setup": {"batch_size", "input_shape", "device", "repeats", "warmup"} | None}``. Raises ``ConfigError`` for
    K < 2 or an unknown input size, ``ValueError`` when no linear head is found."""
    from ..models.classifiers import build_model
    from .common import pick_device

    if num_heads < 2:
        raise ConfigError(f"--heads must be at least 2, got {num_heads}")
    model = build_model(arch, num_classes)
    params = parameter_overhead(model, num_heads, head_name)
    timing, setting, setup = None, "", None
    if measure_time:
        dev = pick_device(device)
        shape = input_shape(arch, model, image_size)
        timing = time_overhead(model, num_heads, shape, batch_size=batch_size, head_name=head_name, device=dev,
                               warmup=warmup, repeats=repeats)
        setting = (f"batch {batch_size} x {'x'.join(map(str, shape))} on {dev}, random weights, median of "
                   f"{repeats} after {warmup} warm-up")
        setup = {"batch_size": batch_size, "input_shape": list(shape), "device": str(dev), "repeats": repeats,
                 "warmup": warmup}
    for line in overhead_lines(arch, num_heads, params, timing, setting):
        log(line)
    return {"arch": arch, "num_heads": num_heads, "params": params, "time": timing, "time_setup": setup}
