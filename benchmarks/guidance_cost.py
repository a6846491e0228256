"""Guided vs unguided generation cost, and how much of the signal gain cheaper guidance keeps.

All variants run in one process on the same jobs (same seeds, same prompts), so the ratios are comparable:

    python benchmarks/guidance_cost.py [--generator DIR] [--classifier RUN/seed_0/base/classifier.json]

Prints, per variant: images/s, slowdown vs unguided, mean signal gain over unguided, and that gain as a
fraction of full guidance (every step, full window, gradient through the decoder only). The project's goal:
guided <= 2x unguided time at >= 90% of the full signal gain.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from longtail.data.datasets import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
    to_model_range,
)
from longtail.evaluation.metrics import signal_scores
from longtail.generate import generate, plan_jobs
from longtail.models.tiny import class_prompt, load_tiny_generator
from longtail.sampling import GuidanceConfig
from longtail.train import TrainConfig, fit, make_classifier


def classifier(path: str | None, seed: int = 0):
    """A demo run's classifier (its ``seed_<s>/base/classifier.json``), or a quickly trained one."""
    if path:
        from longtail.jobs.common import ClassifierSpec, load_classifier_spec

        return load_classifier_spec(ClassifierSpec(spec=path), torch.device("cpu")).model
    model = make_classifier(len(FASHION_MNIST_CLASSES), width=16, num_heads=5, seed=seed)
    images, labels = load_fashion_mnist("train")
    idx = longtail_indices(labels, longtail_counts(), seed=0)
    fit(model, (to_model_range(images[idx]), labels[idx]), TrainConfig(epochs=10, lr=2e-3), show=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default=None, help="embedded generator directory (default: shipped)")
    ap.add_argument("--classifier", default=None, help="a demo run's seed_0/base/classifier.json (default: train one, ~1 min)")
    ap.add_argument("--signal", default="total")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ldm = load_tiny_generator(args.generator)
    model = classifier(args.classifier)
    jobs = plan_jobs([args.per_class] * len(FASHION_MNIST_CLASSES), lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]),
                     base_seed=123)
    full = GuidanceConfig(args.signal, args.weight)
    variants: list[tuple[str, GuidanceConfig | None]] = [
        ("unguided", None),
        ("full guidance", full),
        ("window [0, 0.5)", replace(full, end=0.5)),
        ("window [0, 0.25)", replace(full, end=0.25)),
        ("every 2nd step", replace(full, every=2)),
        ("every 3rd step", replace(full, every=3)),
        ("[0, 0.5) every 2nd", replace(full, end=0.5, every=2)),
        ("through denoiser", replace(full, through_denoiser=True)),
    ]
    generate(ldm, jobs[: args.batch_size], classifier=model, num_steps=2, batch_size=args.batch_size, show=False)  # warm-up
    rows = []
    for name, guidance in variants:
        started = time.perf_counter()
        gen = generate(ldm, jobs, classifier=model, guidance=guidance, num_steps=args.steps,
                       batch_size=args.batch_size, show=False)
        seconds = time.perf_counter() - started
        signal = float(signal_scores(gen.output, [args.signal])[args.signal].mean())
        rows.append((name, len(jobs) / seconds, signal, float(gen.p_class.mean())))
    base_rate, base_signal = rows[0][1], rows[0][2]
    full_gain = rows[1][2] - base_signal
    print(f"{len(jobs)} images, {args.steps} DDIM steps, signal {args.signal}, w={args.weight:g}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<22}{'img/s':>8}{'slowdown':>10}{'signal':>9}{'gain':>8}{'of full':>9}{'P(class)':>10}")
    for name, rate, signal, p in rows:
        gain = signal - base_signal
        share = gain / full_gain if full_gain else float("nan")
        print(f"{name:<22}{rate:>8.1f}{base_rate / rate:>9.2f}x{signal:>9.3f}{gain:>8.3f}{share:>9.0%}{p:>10.3f}")


if __name__ == "__main__":
    main()
