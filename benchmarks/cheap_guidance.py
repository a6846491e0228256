"""Cheap guidance on the embedded default: the share of the signal gain and of the realism kept per unit of time.

One process, the same jobs (seeds, prompts) for every row, so the ratios compare within the run:

    OMP_NUM_THREADS=2 python benchmarks/cheap_guidance.py [--classifier RUN/seed_0/base/classifier.json]

Rows: unguided sampling; Longtail Guidance through the full VAE decoder (every step, whole window: the
reference); a window of the first steps; every n-th step; both; and a cheap decoder on the guidance path only
(final images always come from the full decoder): a ``DecoderTiny`` (diffusers' ``AutoencoderTiny`` decoder
blocks, TAESD's design) and a plain conv stack, each distilled here from the embedded VAE
(``longtail.models.surrogate.distill_decoder``), alone and with every 2nd step.

Columns: ``slowdown`` = seconds per image / unguided's; ``gain kept`` = (signal - unguided's) / (full guidance's
signal - unguided's); ``judge ratio`` = the independent judge's accuracy on the final images / its accuracy on the
unguided images (the realism test of the sweep's rule: at least 0.9 passes); ``gain per time`` = gain kept /
(slowdown - 1), relative to full guidance's. ``pareto`` marks the rows no other row beats on both slowdown and
gain kept. The last line names the cheapest row that keeps >= 90% of the full gain and passes the judge test.

Defaults: the shipped nuisance generator, the classifier of ``runs/demo`` (seed 0, with its Epistemic Head; else
one trained here, ~1 min), the shipped nuisance judge, signal total at w = 1 (the demo's), 20 DDIM steps, CFG 3.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from longtail.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_range
from longtail.evaluation.metrics import signal_scores
from longtail.generate import generate, plan_jobs
from longtail.guidance import GuidanceConfig
from longtail.models.tiny import class_prompt, load_tiny_generator

DEMO_CLASSIFIER = Path("runs/demo/seed_0/base/classifier.json")


@dataclass
class Row:
    name: str
    seconds: float
    signal: float
    p_class: float
    judge_acc: float


def load_models(classifier: str | None, judge_dir: str | None):
    """The guiding classifier (a run's classifier.json, else the benchmark's quick one) and the judge."""
    from longtail.evaluation.judge import Judge, shipped_judge_dir
    from longtail.jobs.common import ClassifierSpec, load_classifier_spec

    cpu = torch.device("cpu")
    path = classifier or (str(DEMO_CLASSIFIER) if DEMO_CLASSIFIER.is_file() else None)
    if path is None:
        from guidance_cost import classifier as quick  # the same quick classifier as guidance_cost.py

        model = quick(None)
    else:
        model = load_classifier_spec(ClassifierSpec(spec=path), cpu).model
    judge_json = Path(judge_dir or shipped_judge_dir("nuisance")) / "classifier.json"
    judge = Judge.from_loaded(load_classifier_spec(ClassifierSpec(spec=str(judge_json)), cpu), name="judge")
    return model, judge, path or "quick (trained here)"


def distilled(ldm, arch: str, steps: int, cache: Path | None = None):
    """A guidance-path decoder distilled from the embedded VAE on Fashion-MNIST training images (seeded, so a
    re-run makes the same one); kept in ``cache/<arch>-<steps>`` and loaded from there when present."""
    from longtail.models.surrogate import distill_decoder, load_surrogate, save_surrogate, surrogate_decode

    folder = cache / f"{arch}-{steps}" if cache is not None else None
    if folder is not None and (folder / "surrogate.json").is_file():
        module = load_surrogate(folder)
    else:
        images = to_model_range(load_fashion_mnist("train")[0][:2000])
        module = distill_decoder(ldm, images, arch=arch, steps=steps, channels=32, seed=0)
        if folder is not None:
            save_surrogate(module, folder)
    return surrogate_decode(module, ldm.vae.config.scaling_factor)


def run_row(name, ldm, jobs, model, judge, guidance, args, guide_decode=None) -> Row:
    started = time.perf_counter()
    gen = generate(ldm, jobs, classifier=model, guidance=guidance, num_steps=args.steps, cfg_scale=args.cfg,
                   batch_size=args.batch_size, guide_decode=guide_decode, show=False)
    seconds = time.perf_counter() - started
    signal = float(signal_scores(gen.output, [args.signal])[args.signal].mean())
    judged = judge.score(gen.images, gen.labels)
    return Row(name, seconds / len(jobs), signal, float(gen.p_class.mean()), judged["accuracy"])


def pareto(rows: list[Row], base: Row, full: Row) -> list[tuple[Row, float, float, bool]]:
    """(row, slowdown, gain kept, on the Pareto front of low slowdown and high gain kept) per guided row."""
    gain = full.signal - base.signal
    points = [(r, r.seconds / base.seconds, (r.signal - base.signal) / gain if gain else float("nan"))
              for r in rows]
    out = []
    for r, slow, kept in points:
        dominated = any(s <= slow and k >= kept and (s < slow or k > kept) for _, s, k in points)
        out.append((r, slow, kept, not dominated))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default="nuisance", help="embedded generator: a directory or a shipped name")
    ap.add_argument("--classifier", default=None, help=f"a run's classifier.json (default: {DEMO_CLASSIFIER})")
    ap.add_argument("--judge", default=None, help="a judge directory (default: the shipped nuisance judge)")
    ap.add_argument("--signal", default="total")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--distill-steps", type=int, default=600)
    ap.add_argument("--passes", type=int, default=2, help="timed passes over the rows, alternating order")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench/cheap_guidance"),
                    help="where the distilled decoders are kept between runs")
    args = ap.parse_args()

    ldm = load_tiny_generator(args.generator)
    model, judge, source = load_models(args.classifier, args.judge)
    jobs = plan_jobs([args.per_class] * len(FASHION_MNIST_CLASSES),
                     lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]), base_seed=321)
    full = GuidanceConfig(args.signal, args.weight)
    started = time.perf_counter()
    decoders = {arch: distilled(ldm, arch, args.distill_steps, args.cache) for arch in ("taesd", "conv")}
    distill_seconds = time.perf_counter() - started
    variants = [
        ("unguided", None, None),
        ("full decoder", full, None),
        ("window [0, 0.5)", replace(full, end=0.5), None),
        ("window [0, 0.25)", replace(full, end=0.25), None),
        ("every 2nd step", replace(full, every=2), None),
        ("every 3rd step", replace(full, every=3), None),
        ("[0, 0.5) every 2nd", replace(full, end=0.5, every=2), None),
        ("DecoderTiny", full, decoders["taesd"]),
        ("DecoderTiny every 2nd", replace(full, every=2), decoders["taesd"]),
        ("conv surrogate", full, decoders["conv"]),
        ("conv every 2nd", replace(full, every=2), decoders["conv"]),
    ]
    generate(ldm, jobs[: args.batch_size], classifier=model, guidance=full, num_steps=2, batch_size=args.batch_size,
             show=False)  # warm-up
    rows = [run_row(name, ldm, jobs, model, judge, g, args, d) for name, g, d in variants]
    for _ in range(args.passes - 1):  # time again in reverse order: a load change hits rows alike (same images)
        for k in reversed(range(len(variants))):
            name, g, d = variants[k]
            rows[k].seconds += run_row(name, ldm, jobs, model, judge, g, args, d).seconds
    for r in rows:
        r.seconds /= args.passes
    base, ref = rows[0], rows[1]
    print(f"{len(jobs)} images, {args.steps} DDIM steps, CFG {args.cfg:g}, signal {args.signal}, w={args.weight:g}, "
          f"{torch.get_num_threads()} threads; classifier {source}; judge {args.judge or 'shipped nuisance'}; "
          f"two decoders distilled ({args.distill_steps} steps each; or loaded from {args.cache}) in "
          f"{distill_seconds:.0f} s; "
          f"times: mean of {args.passes} passes in alternating order")
    print(f"{'variant':<24}{'slowdown':>9}{'signal':>8}{'gain kept':>10}{'P(class)':>9}{'judge acc':>10}"
          f"{'judge ratio':>12}{'gain per time':>14}{'pareto':>7}")
    print(f"{base.name:<24}{1.0:>8.2f}x{base.signal:>8.3f}{'':>10}{base.p_class:>9.3f}{base.judge_acc:>10.3f}"
          f"{1.0:>12.3f}")
    ref_rate = None
    chosen = None
    for r, slow, kept, front in pareto(rows[1:], base, ref):
        per_time = kept / (slow - 1) if slow > 1 else float("inf")
        ref_rate = ref_rate or per_time
        ratio = r.judge_acc / base.judge_acc if base.judge_acc else float("nan")
        print(f"{r.name:<24}{slow:>8.2f}x{r.signal:>8.3f}{kept:>10.0%}{r.p_class:>9.3f}{r.judge_acc:>10.3f}"
              f"{ratio:>12.3f}{per_time / ref_rate:>13.2f}x{'*' if front else '':>7}")
        if kept >= 0.9 and ratio >= 0.9 and (chosen is None or slow < chosen[1]):
            chosen = (r.name, slow, kept)
    if chosen:
        print(f"cheapest row keeping >= 90% of the full gain with judge ratio >= 0.9: {chosen[0]} "
              f"({chosen[1]:.2f}x unguided, {chosen[2]:.0%} of the gain)")
    else:
        print("no row keeps >= 90% of the full gain with judge ratio >= 0.9")


if __name__ == "__main__":
    main()
