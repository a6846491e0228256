"""On-manifold guidance options: cost and effect of each, at one weight, on the embedded default.

All variants run in one process on the same jobs (same seeds, same prompts), so the ratios are comparable:

    python benchmarks/guidance_options.py [--classifier RUN/seed_0/base/classifier.json] [--weight 1]

Prints, per variant (unguided, plain LTG, then each option of ``GuidanceConfig`` on its own and all of them
together): images/s, slowdown vs unguided, denoiser calls per image, mean signal and mean P(intended class) of
the final images. The options: ``views`` (augmentation-averaged signal), ``project`` (MPGD manifold projection
through the autoencoder), ``recurrence`` (Universal Guidance / FreeDoM time travel), ``lowpass`` (Gaussian blur
of the latent gradient). Realism is not measured here: look at the images, or judge them with an independent
classifier.
"""

from __future__ import annotations

import argparse
import time

import torch
from guidance_cost import classifier  # the script's folder is on sys.path when run as a script

from longtail.data.datasets import FASHION_MNIST_CLASSES
from longtail.evaluation.metrics import signal_scores
from longtail.generate import generate, plan_jobs
from longtail.models.tiny import class_prompt, load_tiny_generator
from longtail.sampling import GuidanceConfig


def variants(base: GuidanceConfig, views: int, recurrence: int, lowpass: float) -> list[tuple[str, GuidanceConfig | None]]:
    """(name, guidance) per variant: unguided, plain LTG, each option alone, all options together."""
    return [
        ("unguided", None),
        ("LTG", base),
        (f"views={views}", base.with_options(views=views)),
        ("project (MPGD)", base.with_options(project=True)),
        (f"recurrence={recurrence}", base.with_options(recurrence=recurrence)),
        (f"lowpass={lowpass:g}", base.with_options(lowpass=lowpass)),
        ("all of them", base.with_options(views=views, project=True, recurrence=recurrence, lowpass=lowpass)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default=None, help="embedded generator directory (default: shipped)")
    ap.add_argument("--classifier", default=None, help="a demo run's seed_0/base/classifier.json (default: train one, ~1 min)")
    ap.add_argument("--signal", default="total")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--per-class", type=int, default=10, help="images per class (10 classes)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--recurrence", type=int, default=1)
    ap.add_argument("--lowpass", type=float, default=1.0, help="blur sigma in latent pixels")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--judge", default=None, help="a judge directory (a run's judge/): its accuracy and P(class) too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ldm = load_tiny_generator(args.generator)
    model = classifier(args.classifier)
    names = FASHION_MNIST_CLASSES
    jobs = plan_jobs([args.per_class] * len(names), lambda c, i: class_prompt(names[c]), base_seed=123)
    base = GuidanceConfig(args.signal, args.weight)
    for warm in (None, base):  # warm-up: the first unguided and the first guided call pay one-off costs
        generate(ldm, jobs[: args.batch_size], classifier=model, guidance=warm, num_steps=2,
                 batch_size=args.batch_size, show=False)
    judge = None
    if args.judge:
        from longtail.evaluation.judge import load_judge

        judge = load_judge(args.judge)
    rows = []
    for name, guidance in variants(base, args.views, args.recurrence, args.lowpass):
        started = time.perf_counter()
        gen = generate(ldm, jobs, classifier=model, guidance=guidance, num_steps=args.steps,
                       batch_size=args.batch_size, show=False)
        seconds = time.perf_counter() - started
        signal = float(signal_scores(gen.output, [args.signal])[args.signal].mean())
        calls = args.steps * (1 + (guidance.recurrence if guidance is not None else 0))
        scored = judge.score(gen.images, torch.tensor([j.class_id for j in jobs])) if judge else None
        rows.append((name, len(jobs) / seconds, calls, signal, float(gen.p_class.mean()),
                     scored["accuracy"] if scored else float("nan"), scored["p_class"] if scored else float("nan")))
    base_rate = rows[0][1]
    print(f"{len(jobs)} images, {args.steps} DDIM steps, signal {args.signal}, w={args.weight:g}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<18}{'img/s':>8}{'slowdown':>10}{'calls':>7}{'signal':>9}{'P(class)':>10}{'judge acc':>11}"
          f"{'judge P':>9}")
    for name, rate, calls, signal, p, jacc, jp in rows:
        print(f"{name:<18}{rate:>8.1f}{base_rate / rate:>9.2f}x{calls:>7}{signal:>9.3f}{p:>10.3f}{jacc:>11.3f}{jp:>9.3f}")


if __name__ == "__main__":
    main()
