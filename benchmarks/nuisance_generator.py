"""Does the nuisance generator draw the rare modes rarely when not asked, and draw them when asked?

The premise of the in-class testbed (configs/nuisance.yaml): like Stable Diffusion and extreme views, the
generator has seen every mode but the class prompt seldom produces one. This script measures both halves with
a nuisance-mode detector (``longtail.evaluation.modes.train_mode_detector``, trained here on the full training
set, its recall reported on the test set) and a judge of the garment class trained with the generator's modes:

    python benchmarks/nuisance_generator.py [--model nuisance] [--per-class 30] [--out runs/bench/nuisance_gen]

Prints: the detector's test recall per mode; the share of each mode among class-prompt images (all classes
pooled) next to its training rate; for each mode, the share of images prompted with its caption phrase ("a
photo of a coat, rotated") that the detector names as that mode; the judge's accuracy on each set. Saves a grid
per prompt kind (``grid_<mode>.png``, one row per class) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from longtail.calibrate import save_grid
from longtail.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_range
from longtail.data.nuisance import MODE_NAMES, mode_phrase
from longtail.evaluation.judge import Judge, fashion_mnist_train, train_judge
from longtail.evaluation.modes import DETECTOR_CLASSES, detected_shares, detector_report, train_mode_detector
from longtail.generate import generate, plan_jobs
from longtail.models.tiny import META_FILE, class_prompt, generator_dir, load_tiny_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nuisance", help="embedded generator: a shipped name or a directory")
    ap.add_argument("--per-class", type=int, default=30, help="class-prompt images per class")
    ap.add_argument("--per-mode", type=int, default=5, help="images per class for each mode's prompt")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/nuisance_gen"))
    args = ap.parse_args()
    torch.manual_seed(0)
    meta = json.loads((generator_dir(args.model) / META_FILE).read_text()).get("nuisance") or {}
    ldm = load_tiny_generator(args.model)
    train_x, train_y = fashion_mnist_train()
    test_x = to_model_range(load_fashion_mnist("test")[0])
    detector = Judge(train_mode_detector(train_x, epochs=3), list(DETECTOR_CLASSES), name="mode detector")
    report = detector_report(detector, test_x)
    print("mode detector, test recall: " + ", ".join(f"{m} {r:.2f}" for m, r in report["recall"].items())
          + f"; clean images given a mode {report['clean_false_alarm']:.3f}")
    x, y = fashion_mnist_train(None, meta.get("rates"), int(meta.get("seed", 0))) if meta else (train_x, train_y)
    judge = Judge(train_judge(x, y, 10, epochs=3, seed=10_000), list(FASHION_MNIST_CLASSES), name="judge")

    def draw(per_class: int, phrase: str | None, base_seed: int):
        def prompt(c: int, i: int) -> str:
            text = class_prompt(FASHION_MNIST_CLASSES[c])
            return f"{text}, {phrase}" if phrase else text

        jobs = plan_jobs([per_class] * 10, prompt, base_seed=base_seed)
        return generate(ldm, jobs, num_steps=20, cfg_scale=3.0, batch_size=100, show=False), \
            torch.tensor([j.class_id for j in jobs])

    gen, labels = draw(args.per_class, None, 0)
    shares = detected_shares(detector, gen.images, labels.tolist(), FASHION_MNIST_CLASSES)["all"]
    judged = judge.score(gen.images, labels)["accuracy"]
    rates = meta.get("rates", {})
    print(f"\nclass prompt, {len(labels)} images: judge accuracy {judged:.3f}")
    print(f"{'mode':<14}{'training rate':>14}{'share drawn':>13}")
    for m in MODE_NAMES:
        print(f"{m:<14}{rates.get(m, 0.0):>14.3f}{shares[m]:>13.3f}")
    save_grid({0.0: gen.images}, labels, args.out / "grid_class_prompt.png", per_class=8)
    print(f"\n{'prompted mode':<14}{'phrase':<22}{'named as it':>12}{'judge acc':>11}")
    for k, m in enumerate(MODE_NAMES):
        gen_m, labels_m = draw(args.per_mode, mode_phrase(m), 1000 * (k + 1))
        hit = detected_shares(detector, gen_m.images, labels_m.tolist(), FASHION_MNIST_CLASSES)["all"][m]
        print(f"{m:<14}{mode_phrase(m):<22}{hit:>12.3f}{judge.score(gen_m.images, labels_m)['accuracy']:>11.3f}")
        save_grid({0.0: gen_m.images}, labels_m, args.out / f"grid_{m}.png", per_class=args.per_mode)
    print(f"\ngrids in {args.out}")


if __name__ == "__main__":
    main()
