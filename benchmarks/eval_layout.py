"""Evaluation speed on the CPU: the demo's classifier over 10,000 images in the default (contiguous) layout vs
channels-last, which ``longtail.train.predict_loader`` uses on the CPU. Prints the ratio measured in one run and
the largest logit difference (float rounding only).

    python benchmarks/eval_layout.py [--repeats 3] [--batch 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from longtail.train import make_classifier


def timed(model: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            out = torch.cat([model(c).logits for c in x.split(batch)])
            times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    model = make_classifier(num_classes=10, width=16).eval()
    x = torch.randn(10_000, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    timed(model, x[:1024], args.batch, 1)  # warm-up
    plain, a = timed(model, x, args.batch, args.repeats)
    model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    timed(model, xc[:1024], args.batch, 1)
    fast, b = timed(model, xc, args.batch, args.repeats)
    print(f"SmallCNN (width 16) + 5 heads, 10,000 images 1x32x32, batch {args.batch}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    print(f"channels-last vs contiguous: {plain / fast:.2f}x faster; max |logit difference| "
          f"{float((a - b).abs().max()):.2e}; same argmax on {float((a.argmax(-1) == b.argmax(-1)).float().mean()):.4f}")


if __name__ == "__main__":
    main()
