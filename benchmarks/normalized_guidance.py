"""Does normalising the guidance gradient make one weight fit every signal? Measured, not assumed.

For each signal, sweep weights with the raw gradient (Eq. 11 as written) and with the gradient rescaled to the
noise estimate's RMS per sample (``GuidanceConfig(normalize=True)``), and print the weight the paper's rule
picks in each case. If normalisation made the weight transferable, the normalised choices would coincide.

    python benchmarks/normalized_guidance.py [--generator DIR] [--classifier RUN/seed_0/base/classifier.json]
"""

from __future__ import annotations

import argparse

import torch
from guidance_cost import classifier

from longtail.calibrate import choose_weight, sweep
from longtail.data.datasets import FASHION_MNIST_CLASSES
from longtail.generate import generate, plan_jobs
from longtail.models.tiny import class_prompt, load_tiny_generator
from longtail.sampling import GuidanceConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default=None)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--signals", default="entropy,energy,total,epistemic")
    ap.add_argument("--raw-weights", default="0.1,0.3,1,3,10")
    ap.add_argument("--norm-weights", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ldm = load_tiny_generator(args.generator)
    model = classifier(args.classifier)
    jobs = plan_jobs([args.per_class] * len(FASHION_MNIST_CLASSES),
                     lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]), base_seed=321)
    signals = args.signals.split(",")

    def run(guidance):
        return generate(ldm, jobs, classifier=model, guidance=guidance, num_steps=args.steps, batch_size=100,
                        show=False)

    print(f"{'signal':<10}{'gradient':<12}{'weights swept':<26}{'chosen':>8}   reason")
    for normalize, weights in ((False, args.raw_weights), (True, args.norm_weights)):
        ws = [float(w) for w in weights.split(",")]
        points = sweep(run, signals, ws, base=GuidanceConfig(normalize=normalize))
        for s in signals:
            choice = choose_weight(points, s)
            label = "normalised" if normalize else "raw"
            chosen = "-" if choice.weight is None else f"{choice.weight:g}"
            print(f"{s:<10}{label:<12}{weights:<26}{chosen:>8}   {choice.reason}")


if __name__ == "__main__":
    main()
