"""The embedded demo's speed levers, each measured within one run, each checked to leave results unchanged.

    python benchmarks/demo_levers.py [--passes 2]

1. The allocator (``longtail.allocator.keep_freed_memory``): the same slice of the demo (base-classifier
   training epochs, evaluation of the 10k test set at batch 512 and 128, unguided and guided generation with
   the shipped nuisance generator) in fresh processes with glibc's default malloc settings and with the tuned
   ones, alternating; seconds and minor page faults (``getrusage``) per part, and the ratio.
2. Text keys / values once per sampling call (``longtail.models.text_kv``): one UNet call at the demo's CFG batch
   (200) with diffusers' ``AttnProcessor2_0`` vs ``TextKVProcessor``; outputs compared with ``torch.equal``.
3. Evaluation batch 512 vs 128 (``longtail.data.sources.EVAL_BATCH``): ``predict_loader`` over the 10k test set;
   logits compared with ``torch.equal``.
4. The UNet's CFG batch of 200 in one call vs two calls of 100 (why ``generator.batch_size`` stays 100: the
   smaller batches that ran faster before were avoiding page faults, which 1 removes).

2-4 run in this process with the allocator tuned, as ``longtail`` runs. Medians over ``--passes``; the
ratios are the point (a busy machine moves seconds, much less ratios measured side by side).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

PARTS = ("training (3 epochs)", "evaluation (10k, batch 512)", "evaluation (10k, batch 128)",
         "generation unguided (100)", "generation guided (100)")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn) -> tuple[float, int]:
    """Seconds and minor page faults of ``fn()``."""
    faults, started = _faults(), time.perf_counter()
    fn()
    return time.perf_counter() - started, _faults() - faults


def worker(tuned: bool) -> dict:
    """One process: the demo slice, timed per part (``PARTS``), plus the process's minor page faults."""
    if tuned:
        from longtail.allocator import keep_freed_memory

        assert keep_freed_memory(), "the allocator settings did not apply (not glibc, or a MALLOC_* variable set)"
    from torch.utils.data import DataLoader, TensorDataset

    from longtail.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_range
    from longtail.data.sources import FashionMNISTLT
    from longtail.generate import generate, plan_jobs
    from longtail.guidance import GuidanceConfig
    from longtail.models.tiny import class_prompt, load_tiny_generator
    from longtail.train import TrainConfig, fit, make_classifier, predict_loader

    source = FashionMNISTLT()
    model = make_classifier(num_classes=10, width=16, num_heads=5, seed=0)
    cfg = TrainConfig(epochs=3, lr=0.002, batch_size=128)
    test_x, test_y = to_model_range(load_fashion_mnist("test")[0]), load_fashion_mnist("test")[1]
    ldm = load_tiny_generator("nuisance")
    jobs = plan_jobs([10] * len(FASHION_MNIST_CLASSES), lambda c, i: class_prompt(FASHION_MNIST_CLASSES[c]),
                     base_seed=7)
    test = TensorDataset(test_x, test_y)
    return {
        PARTS[0]: _timed(lambda: fit(model, (source.train_x, source.train_y), cfg, show=False)),
        PARTS[1]: _timed(lambda: predict_loader(model, DataLoader(test, batch_size=512))),
        PARTS[2]: _timed(lambda: predict_loader(model, DataLoader(test, batch_size=128))),
        PARTS[3]: _timed(lambda: generate(ldm, jobs, num_steps=20, cfg_scale=3.0, batch_size=100, show=False)),
        PARTS[4]: _timed(lambda: generate(ldm, jobs, classifier=model, guidance=GuidanceConfig("total", 1.0),
                                          num_steps=20, cfg_scale=3.0, batch_size=100, show=False)),
    }


def allocator_table(passes: int) -> None:
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for p in range(passes):
        for name in (("default", "tuned") if p % 2 == 0 else ("tuned", "default")):
            done = subprocess.run([sys.executable, __file__, "--worker", name], check=True,
                                  capture_output=True, text=True, env=_env(name))
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"1. allocator: glibc defaults vs keep_freed_memory(), fresh processes, median of {passes}")
    print(f"   {'part':30s} {'default s':>10s} {'tuned s':>8s} {'ratio':>6s} {'faults default':>15s} "
          f"{'faults tuned':>13s}")

    def med(name: str, part: str, i: int) -> float:
        return statistics.median(r[part][i] for r in runs[name])

    for part in PARTS:
        d, t = med("default", part, 0), med("tuned", part, 0)
        print(f"   {part:30s} {d:10.2f} {t:8.2f} {t / d:5.2f}x {med('default', part, 1):15,.0f} "
              f"{med('tuned', part, 1):13,.0f}")
    d_total = statistics.median(sum(r[p][0] for p in PARTS) for r in runs["default"])
    t_total = statistics.median(sum(r[p][0] for p in PARTS) for r in runs["tuned"])
    print(f"   {'all':30s} {d_total:10.2f} {t_total:8.2f} {t_total / d_total:5.2f}x")


def _env(name: str) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["LONGTAIL_MALLOC"] = "default" if name == "default" else ""
    return env


def text_kv_table(passes: int) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from longtail.models.text_kv import TextKVProcessor, text_kv_scope
    from longtail.models.tiny import load_tiny_generator

    torch.manual_seed(0)
    ldm = load_tiny_generator("nuisance")
    text = ldm.encode_prompts(["a photo of a shirt"] * 100 + [""] * 100)
    z, t = torch.randn(200, 4, 8, 8), torch.full((200,), 500)
    names = list(ldm.unet.attn_processors)
    timings: dict[str, list[float]] = {"AttnProcessor2_0": [], "TextKVProcessor": []}
    outputs = {}
    with torch.no_grad():
        for _ in range(passes):
            for name, make in (("AttnProcessor2_0", AttnProcessor2_0), ("TextKVProcessor", TextKVProcessor)):
                ldm.unet.set_attn_processor({n: make() for n in names})
                with text_kv_scope(ldm.unet):  # as sampling.sample enters it for one call
                    ldm.denoise(z, t, text)  # warm-up, and (kept at the second sighting) the projections
                    outputs[name] = ldm.denoise(z, t, text)
                    started = time.perf_counter()
                    for _ in range(10):
                        ldm.denoise(z, t, text)
                    timings[name].append((time.perf_counter() - started) / 10)
    plain, cached = (statistics.median(v) for v in timings.values())
    same = torch.equal(outputs["AttnProcessor2_0"], outputs["TextKVProcessor"])
    print(f"2. text keys / values: UNet call at batch 200, median of {passes} x 10 calls")
    print(f"   AttnProcessor2_0 {plain * 1000:.1f} ms, TextKVProcessor {cached * 1000:.1f} ms: "
          f"{cached / plain:.2f}x, outputs torch.equal: {same}")


def eval_batch_table(passes: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from longtail.data.datasets import load_fashion_mnist, to_model_range
    from longtail.train import make_classifier, predict_loader

    images, labels = load_fashion_mnist("test")
    data = TensorDataset(to_model_range(images), labels)
    model = make_classifier(num_classes=10, width=16, num_heads=5, seed=0)
    timings: dict[int, list[float]] = {512: [], 128: []}
    logits = {}
    for _ in range(passes):
        for bs in timings:
            started = time.perf_counter()
            out, _ = predict_loader(model, DataLoader(data, batch_size=bs))
            timings[bs].append(time.perf_counter() - started)
            logits[bs] = out.logits
    t512, t128 = (statistics.median(v) for v in timings.values())
    print(f"3. evaluation batch: predict_loader over the 10k test set, median of {passes}")
    print(f"   512: {t512:.2f} s, 128: {t128:.2f} s: {t128 / t512:.2f}x, logits torch.equal: "
          f"{torch.equal(logits[512], logits[128])}")


def unet_chunk_table(passes: int) -> None:
    from longtail.models.tiny import load_tiny_generator

    torch.manual_seed(0)
    ldm = load_tiny_generator("nuisance")
    text = ldm.encode_prompts(["a photo of a shirt"] * 100 + [""] * 100)
    z, t = torch.randn(200, 4, 8, 8), torch.full((200,), 500)
    halves = [(z[i:i + 100], t[i:i + 100], text[i:i + 100]) for i in (0, 100)]
    timings: dict[str, list[float]] = {"1 x 200": [], "2 x 100": []}
    outputs = {}
    with torch.no_grad():
        for _ in range(passes):
            for name in timings:
                def once(name: str = name) -> torch.Tensor:
                    if name == "1 x 200":
                        return ldm.denoise(z, t, text)
                    return torch.cat([ldm.denoise(*half) for half in halves])
                outputs[name] = once()
                started = time.perf_counter()
                for _ in range(10):
                    once()
                timings[name].append((time.perf_counter() - started) / 10)
    whole, split = (statistics.median(v) for v in timings.values())
    print(f"4. UNet batch: the CFG batch of 200 in one call vs two calls of 100, median of {passes} x 10")
    print(f"   1 x 200: {whole * 1000:.1f} ms, 2 x 100: {split * 1000:.1f} ms: {split / whole:.2f}x, outputs "
          f"torch.equal: {torch.equal(outputs['1 x 200'], outputs['2 x 100'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=2, help="timed passes per lever (medians are printed)")
    ap.add_argument("--worker", choices=("tuned", "default"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "tuned")))
        return
    print(f"command: python benchmarks/demo_levers.py --passes {args.passes}  (torch threads: "
          f"{torch.get_num_threads()})")
    allocator_table(args.passes)
    from longtail.allocator import keep_freed_memory

    keep_freed_memory()
    text_kv_table(max(args.passes, 3))
    eval_batch_table(max(args.passes, 3))
    unet_chunk_table(max(args.passes, 3))


if __name__ == "__main__":
    main()
