"""``longtail evaluate``: one classifier (+ heads) on one dataset, real or synthetic, every metric that applies.

- top-1, per-class and Many / Medium / Few accuracy (groups from the training counts, when given);
- detection of rare and hard examples by every signal (AUROC; accuracy above vs below the 90% quantile), and
  the same for an independently trained ensemble when its checkpoints are given (paper Figure 5);
- for a generated set (an ImageFolder with the ``manifest.csv`` of ``longtail generate``): mean signal,
  mean P(intended class) and accuracy per guidance weight (Figure 2);
- distances to a real ImageFolder: FID and precision / recall per class and overall, on a classifier layer's
  features or, given local weights, the FID Inception network.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import dump_config
from ..data.imagefolder import (
    ImageIndex,
    ImageListDataset,
    eval_transform,
    read_class_names,
    scan_imagefolder,
)
from ..files import write_json
from ..jobs.common import ClassifierSpec, load_classifier_spec, pick_device, read_counts
from ..jobs.mine import preprocess_for
from ..outputs import ClassifierOutput
from .distribution import distribution_report
from .metrics import accuracy_report, detection_report, signal_scores
from .stats import number_cell


@dataclass
class EvaluateConfig:
    out: str | None = None  # where evaluate.json goes (default: printed only)
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    data: str | None = None  # ImageFolder to evaluate (real, or synthetic with manifest.csv)
    train: str | None = None  # training ImageFolder, for per-class counts -> Many / Medium / Few
    counts_file: str | None = None  # or the counts as a file
    many: int = 100
    few: int = 20
    real: str | None = None  # a real ImageFolder to measure FID / precision / recall against
    layer: str | None = None  # feature layer (default: the input of the classifier's head)
    inception: str | None = None  # local FID Inception weights: use them as the feature extractor instead
    ensemble: list[str] = field(default_factory=list)  # checkpoints of K independently trained classifiers
    k: int = 3
    batch_size: int = 64
    device: str = "auto"


def _predict(model: torch.nn.Module, dataset, batch_size: int, device) -> tuple[ClassifierOutput, torch.Tensor]:
    from ..train import predict

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return predict(model, x.to(device), batch_size), y


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def by_weight(manifest: Path, out: ClassifierOutput, labels: torch.Tensor, paths: list[Path]) -> dict[str, dict]:
    """Figure 2 view of a generated set: per guidance weight, mean signal / P(intended class) / accuracy."""
    with manifest.open() as f:
        rows = {str((manifest.parent / r["path"]).resolve()): r for r in csv.DictReader(f)}
    probs = out.logits.float().softmax(-1)
    p_class = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    correct = (probs.argmax(-1) == labels).float()
    scores = signal_scores(out)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        row = rows.get(str(Path(path).resolve()))
        if row is not None:
            groups[row.get("weight") or "0"].append(i)
    result = {}
    for weight, idx in sorted(groups.items(), key=lambda kv: float(kv[0])):
        ix = torch.tensor(idx)
        result[weight] = {"n": len(idx), "p_class": float(p_class[ix].mean()), "accuracy": float(correct[ix].mean()),
                          **{f"signal_{k}": float(v[ix].mean()) for k, v in scores.items()}}
    return result


def run_evaluate(cfg: EvaluateConfig, log: Callable[[str], None] = print) -> dict:

    if not cfg.data:
        raise ValueError("evaluate needs data (an ImageFolder directory)")
    check_imagefolder(cfg.data)
    device = pick_device(cfg.device)
    loaded = load_classifier_spec(cfg.classifier, device)
    names = read_class_names(cfg.classifier.class_names) if cfg.classifier.class_names else loaded.class_names
    index = _scan(cfg.data, names, loaded.num_classes, log)
    names = index.class_names
    pre = preprocess_for(loaded)
    dataset = ImageListDataset(index.paths, index.labels, eval_transform(pre), pre.mode)
    out, labels = _predict(loaded.model, dataset, cfg.batch_size, device)
    if cfg.train:
        counts = _scan(cfg.train, names, None, log, verify=False).counts()
    elif cfg.counts_file:
        counts = read_counts(cfg.counts_file, list(names))
    else:
        counts = None
    groups = ([("many" if n > cfg.many else "few" if n < cfg.few else "medium") for n in counts] if counts
              else ["many"] * len(names))
    report: dict = {"data": cfg.data, "class_names": list(names), "n": len(labels),
                    "missing_classes": index.missing, "hidden_skipped": index.hidden,
                    "accuracy": accuracy_report(out.logits.argmax(-1), labels, groups), "groups": groups}
    if counts is None:
        for g in ("many", "medium", "few"):  # no training counts: no groups to report
            report["accuracy"].pop(g, None)
            report["accuracy"].pop(f"{g}_reason", None)
    report["detection"] = detection_report(out, labels, groups)
    if counts is None:  # no class is known to be rare: say so instead of "only one class present"
        for d in report["detection"].values():
            d["auroc_rare"], d["auroc_rare_reason"] = None, NO_COUNTS
    if cfg.ensemble:
        members = []
        for path in cfg.ensemble:
            member = load_classifier_spec(ClassifierSpec(**{**cfg.classifier.__dict__, "checkpoint": path,
                                                            "heads": None}), device)
            members.append(_predict(member.model, dataset, cfg.batch_size, device)[0].logits)
        stacked = torch.stack(members, dim=1)
        ens = detection_report(ClassifierOutput(stacked.mean(1), stacked), labels, groups,
                               names=["total", "aleatoric", "epistemic"])
        report["detection"].update({f"ensemble_{k}": v for k, v in ens.items()})
    manifest = Path(cfg.data) / "manifest.csv"
    if manifest.is_file():
        report["by_weight"] = by_weight(manifest, out, labels, index.paths)
    if cfg.real:
        report["distribution"] = _distances(cfg, loaded, names, pre, dataset, labels, device, log)
    _print(report, log)
    if cfg.out:
        path = Path(cfg.out)
        path.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, path / "config.yaml")
        write_json(path / "evaluate.json", report)  # strict JSON: an undefined figure is null
    return report


NO_COUNTS = ("no training counts given (--train or counts_file), so no class is known to be rare; "
             "Many / Medium / Few are not reported either")


def check_imagefolder(root: str) -> None:
    """``DataError`` naming ``root`` when it is a Parquet / WebDataset store (``generate --format``), which
    ``evaluate`` does not read: it takes ImageFolders (a ``--format png`` store is one)."""
    from ..data.datasets import DataError
    from ..data.store_formats import store_format

    try:
        fmt = store_format(root)
    except ValueError:
        return
    if fmt in ("parquet", "webdataset"):
        raise DataError(f"{root} is a {fmt} store; evaluate reads ImageFolders (class folders of images): generate "
                        "with --format png to evaluate it, or load it with datasets.load_dataset")


def _scan(root: str, names: list[str] | None, num_classes: int | None, log: Callable[[str], None],
          verify: bool = True) -> ImageIndex:
    """An evaluation ImageFolder, folders matched to the classifier's classes by name; a class without a folder
    is a warning (its accuracy is then null), as are skipped hidden entries."""
    index = scan_imagefolder(root, names, verify=verify, allow_missing=True, num_classes=num_classes)
    if index.missing:
        log(f"warning: {root} has no folder for the classes {index.missing}; their accuracy is reported as "
            "absent (null)")
    if index.hidden:
        log(f"{root}: skipped {index.hidden} hidden entries (names starting with '.', __MACOSX)")
    return index


def _distances(cfg: EvaluateConfig, loaded, names, pre, dataset, labels, device, log: Callable[[str], None]
               ) -> dict:
    from .features import InceptionFeatures, LayerFeatures, extract

    real_index = _scan(cfg.real, names, None, log)
    real_ds = ImageListDataset(real_index.paths, real_index.labels, eval_transform(pre), pre.mode)
    if cfg.inception:
        extractor = InceptionFeatures(cfg.inception, input_range=(-1, 1), device=device)

        def prep(x: torch.Tensor) -> torch.Tensor:  # classifier-normalised -> [-1, 1], 3 channels
            mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
            std = torch.tensor(pre.std).view(1, -1, 1, 1)
            x = (x * std + mean) * 2 - 1
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    else:
        extractor = LayerFeatures(loaded.model, cfg.layer)

        def prep(x: torch.Tensor) -> torch.Tensor:
            return x
    fake = extract(extractor, prep(_images(dataset)).to(device), cfg.batch_size)
    real = extract(extractor, prep(_images(real_ds)).to(device), cfg.batch_size)
    return distribution_report(real, torch.tensor(real_index.labels), fake, labels, list(names), k=cfg.k)


def _print(report: dict, log: Callable[[str], None]) -> None:
    """The report as a few lines; undefined figures print as ``n/a``, with their reasons below the table."""
    acc, cell = report["accuracy"], number_cell
    groups = [f"{g} {cell(acc[g], 4)}" for g in ("many", "medium", "few") if g in acc]
    log(f"{report['data']}: {report['n']} images; " + ", ".join([f"top-1 {cell(acc['top1'], 4)}", *groups]))
    log(f"{'signal':<20}{'AUROC rare':>12}{'AUROC hard':>12}{'acc > q90':>11}{'acc < q90':>11}")
    for name, d in report["detection"].items():
        log(f"{name:<20}{cell(d['auroc_rare'], width=12)}{cell(d['auroc_hard'], width=12)}"
            f"{cell(d['acc_above_q90'], width=11)}{cell(d['acc_below_q90'], width=11)}")
    reasons = {f"{k.removesuffix('_reason')}: {v}" for d in report["detection"].values() for k, v in d.items()
               if k.endswith("_reason")}
    for reason in sorted(reasons):
        log(f"  n/a {reason}")
    for weight, d in report.get("by_weight", {}).items():
        sig = ", ".join(f"{k[7:]} {cell(v)}" for k, v in d.items() if k.startswith("signal_"))
        log(f"weight {weight}: n {d['n']}, P(class) {cell(d['p_class'])}, accuracy {cell(d['accuracy'])}; {sig}")
    if "distribution" in report:
        o = report["distribution"]["overall"]
        log(f"vs real: FID {cell(o['fid'])}, precision {cell(o['precision'])}, recall {cell(o['recall'])} "
            f"({o['n_fake']} synthetic, {o['n_real']} real images)"
            + ("" if o["reliable"] else f"; unreliable: {o['reason']}"))
