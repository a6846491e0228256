"""Epistemic Head variants on the embedded default: which training makes the heads' disagreement a signal.

Takes the demo's trained base classifiers (``runs/demo/seed_<s>/base/classifier.json``, their heads dropped),
trains fresh Epistemic Heads on them with each variant (the demo's recipe: 6 epochs, lr 0.002, 5 heads, init
noise 0.1, the fine-tuning augmentation), and scores them on Fashion-MNIST-LT's VALIDATION split (500 unused
training images per class; the test set is never read):

    python benchmarks/heads_variants.py [--run runs/demo] [--seeds 0 1 2] [--threads 1] [--epochs 6]

Variants: the oracle loss from copies of the trained head (today's default); relaxed winner-takes-all
(Rupprecht et al. 2017) with a constant or an annealed epsilon; per-head Poisson(1) bootstrap resamples, alone and
with relaxation; the plain mean of the heads' losses (epsilon = 1 - 1/K), alone and on bootstrap resamples (bagging
of the last layer); fresh (independent) initialisation with the oracle or the relaxed loss, and with bootstrap +
relaxation or bagging (a deep-ensemble-like start); and the untrained noisy copies, for scale. Prints, as mean +- std (n - 1) over seeds: AUROC of the epistemic and
total signals for rare (Few-class) and hard (misclassified) examples next to entropy and energy of the base
logits, accuracy above / below each signal's 90% quantile, and the heads' agreement (mean pairwise KL between
head softmaxes, share of examples whose head argmaxes differ, mean accuracy of one head, accuracy of the head
average). The base model is
checked to give bit-identical logits after every variant.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from longtail.data.nuisance import MODE_NAMES
from longtail.data.sources import FashionMNISTLT, Recipe
from longtail.evaluation.metrics import detection_report
from longtail.heads import EpistemicClassifier, HeadLoss, HeadsOnly
from longtail.jobs.common import load_classifier_spec, resolve_classifier_spec
from longtail.jobs.mine_config import ClassifierSpec
from longtail.outputs import ClassifierOutput
from longtail.train import TrainConfig, fit, tensor_augment

# name -> (init, HeadLoss keyword arguments[, epochs]); "untrained copies" is the starting point, for scale
VARIANTS: dict[str, tuple] = {
    "untrained copies": ("copy", {}, 0),
    "oracle, copy (today)": ("copy", {}),
    "relaxed eps=0.05": ("copy", {"epsilon": 0.05}),
    "relaxed eps=0.2": ("copy", {"epsilon": 0.2}),
    "annealed eps 0.5->0": ("copy", {"epsilon": 0.5, "epsilon_end": 0.0}),
    "bootstrap": ("copy", {"bootstrap": True}),
    "bootstrap + eps=0.05": ("copy", {"bootstrap": True, "epsilon": 0.05}),
    "mean, eps=0.8 (=1-1/K)": ("copy", {"epsilon": 0.8}),
    "bootstrap + mean (bagging)": ("copy", {"bootstrap": True, "epsilon": 0.8}),
    "fresh, oracle": ("fresh", {}),
    "fresh, eps=0.05": ("fresh", {"epsilon": 0.05}),
    "fresh, bootstrap + eps=0.05": ("fresh", {"bootstrap": True, "epsilon": 0.05}),
    "fresh, bootstrap + mean": ("fresh", {"bootstrap": True, "epsilon": 0.8}),
}

NUM_HEADS, EPOCHS, LR, INIT_NOISE = 5, 6, 0.002, 0.1  # configs/demo.yaml's heads section


def load_base(run: Path, seed: int) -> torch.nn.Module:
    """The seed's trained base classifier without its Epistemic Head (eval mode, CPU)."""
    spec = resolve_classifier_spec(ClassifierSpec(spec=str(run / f"seed_{seed}" / "base" / "classifier.json")))
    return load_classifier_spec(replace(spec, heads=None, num_heads=None), torch.device("cpu")).model


@torch.no_grad()
def eval_outputs(model: EpistemicClassifier, x: torch.Tensor, batch_size: int = 500) -> ClassifierOutput:
    """Base logits ``[N, C]`` and head features ``[N, D]`` of the evaluation images, in one pass each."""
    model.eval()
    outs = [model(chunk) for chunk in x.split(batch_size)]
    return ClassifierOutput(logits=torch.cat([o.logits for o in outs]),
                            features=torch.cat([o.features for o in outs]))


def agreement(head_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean pairwise KL(p_i || p_j) over ordered head pairs ``i != j`` and examples; share of examples whose
    head argmaxes are not all equal; mean top-1 accuracy of one head; top-1 accuracy of the head-averaged
    prediction. ``[N, K, C]``, ``[N]``."""
    log_p = torch.log_softmax(head_logits.double(), dim=-1)  # [N, K, C]
    kl = (log_p.exp().unsqueeze(2) * (log_p.unsqueeze(2) - log_p.unsqueeze(1))).sum(-1)  # [N, K, K]
    k = head_logits.shape[1]
    arg = head_logits.argmax(-1)  # [N, K]
    return {"kl": float(kl.sum((1, 2)).mean() / (k * (k - 1))),
            "argmax_differ": float((arg != arg[:, :1]).any(1).double().mean()),
            "each_acc": float((arg == labels.unsqueeze(1)).double().mean()),
            "head_acc": float((log_p.exp().mean(1).argmax(-1) == labels).double().mean())}


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f}±{std:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a demo run with seed_<s>/base/classifier.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=None, help="a subset of the variant names")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="head training epochs (the demo's: 6)")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="val: choose (the default); test: confirm a choice, once, on seeds no choice used")
    ap.add_argument("--nuisance", action="store_true", help="the run is on the nuisance testbed (configs/demo.yaml's modes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    variants = {n: v for n, v in VARIANTS.items() if args.variants is None or n in args.variants}
    nuisance = dict.fromkeys(MODE_NAMES, 0.03) if args.nuisance else None
    source = FashionMNISTLT(None, 1000, 100.0, 0, 100, 20, eval_split=args.split, val_per_class=500,
                            nuisance=nuisance)
    recipe = Recipe()  # the fine-tuning recipe's feed: batch 128, rotation 15, shift 2, flips, uniform sampling
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        probe = EpistemicClassifier(load_base(Path(args.run), seed), num_heads=NUM_HEADS, seed=seed)
        ref = eval_outputs(probe, source.eval_x)
        base_report = detection_report(ClassifierOutput(ref.logits), source.eval_y, source.groups,
                                       names=["entropy", "energy"])
        for name in ("entropy", "energy"):
            for key, value in base_report[name].items():
                rows.setdefault(f"{name} (base logits)", {}).setdefault(key, []).append(value)
        for name, (init, loss_kwargs, *epochs) in variants.items():
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            wrapped = EpistemicClassifier(load_base(Path(args.run), seed), num_heads=NUM_HEADS, init_noise=INIT_NOISE,
                                          seed=seed, init=init)
            tc = TrainConfig(epochs=epochs[0] if epochs else args.epochs, lr=LR, weight_decay=5e-4, batch_size=recipe.batch_size,
                             rotation=recipe.rotation, translate=recipe.translate, hflip=recipe.hflip, seed=seed)
            fit(HeadsOnly(wrapped, HeadLoss(seed=seed, **loss_kwargs)), source.train_loader(recipe, seed), tc,
                num_classes=len(source.class_names), batch_transform=tensor_augment(tc), show=False)
            check = eval_outputs(wrapped, source.eval_x[:500])
            if not torch.equal(check.logits, ref.logits[:500]):
                raise AssertionError(f"{name}: base logits changed by head training")
            with torch.no_grad():
                head_logits = wrapped.heads(ref.features)
            out = ClassifierOutput(logits=ref.logits, head_logits=head_logits)
            report = detection_report(out, source.eval_y, source.groups, names=["epistemic", "total"])
            row = rows.setdefault(name, {})
            for signal in ("epistemic", "total"):
                for key, value in report[signal].items():
                    if not key.endswith("_reason"):
                        row.setdefault(f"{signal}_{key}", []).append(value)
            for key, value in agreement(head_logits, source.eval_y).items():
                row.setdefault(key, []).append(value)
            print(f"seed {seed} {name}: epistemic AUROC rare {report['epistemic']['auroc_rare']:.3f} hard "
                  f"{report['epistemic']['auroc_hard']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print_tables(rows, variants, args.seeds, args.epochs, time.perf_counter() - started, args.split)


def print_tables(rows: dict[str, dict[str, list[float]]], variants: dict, seeds: list[int], epochs: int,
                 seconds: float, split: str = "val") -> None:
    n_eval = "5000 validation images" if split == "val" else "10000 test images"
    print(f"\nEpistemic Head variants, Fashion-MNIST-LT {'validation' if split == 'val' else 'test'} split ({n_eval}), seeds {seeds}, "
          f"mean±std over seeds; {NUM_HEADS} heads, {epochs} epochs, lr {LR}, init noise {INIT_NOISE}")
    w = max(len(n) for n in rows) + 2
    base_rows = ("entropy (base logits)", "energy (base logits)")

    def table(headers: tuple[str, ...], base_keys: tuple[str, ...], variant_keys: tuple[str, ...]) -> None:
        print(f"\n{'signal / variant':<{w}}" + "".join(f"{h:>15}" for h in headers))
        for names, keys in ((base_rows, base_keys), (variants, variant_keys)):
            for name in names:
                print(f"{name:<{w}}" + "".join(f"{cell(rows[name][k]):>15}" for k in keys))

    table(("epi AUROC rare", "epi AUROC hard", "tot AUROC rare", "tot AUROC hard"), ("auroc_rare", "auroc_hard"),
          ("epistemic_auroc_rare", "epistemic_auroc_hard", "total_auroc_rare", "total_auroc_hard"))
    table(("epi acc>q90", "epi acc<q90", "tot acc>q90", "tot acc<q90", "pair KL", "argmax differ", "one-head acc",
           "head-avg acc"), ("acc_above_q90", "acc_below_q90"),
          ("epistemic_acc_above_q90", "epistemic_acc_below_q90", "total_acc_above_q90", "total_acc_below_q90",
           "kl", "argmax_differ", "each_acc", "head_acc"))
    print("(entropy / energy rows: accuracy above / below their own 90% quantile)")
    print(f"\nwall time {seconds:.0f} s")


if __name__ == "__main__":
    main()
