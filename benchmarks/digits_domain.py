"""A second real domain end to end: long-tailed scikit-learn digits, a generator trained on them, `longtail mine`.

    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/digits_domain.py > runs/digits.log 2>&1 &

1. ``longtail.data.digits.write_digits_lt``: scikit-learn's 8x8 digits (offline) as 16 px ImageFolders, split by
   seed 0 into test (40 per digit), validation (30 per digit) and a long-tailed training set (100 .. 5 per digit).
2. ``longtail train-generator --data <train> --config configs/digits/generator.yaml``: the embedded generator
   trained on the long-tailed training set alone (its wall time is printed; the metadata keeps it too).
3. ``longtail mine --config configs/digits/mine.yaml``: base classifier, Epistemic Head, weight sweep (the
   paper's rule), mining for none / unguided / LTG / best-of-4 over seeds 0, 1, 2, distances, report; evaluated
   on the test split. ``--val`` evaluates on the validation split instead (``runs/digits/mine_val``): the split
   to read while choosing settings.

``--rare-check`` (after step 2): how well the generator draws each digit. A judge (``SmallCNN``) is trained on
every digit image outside validation and test (about 107 per digit, balanced: the training set plus the pool it
was cut from) and scores 50 unguided images per digit (20 DDIM steps, CFG 3); its accuracy on the test split is
printed beside, as its ceiling. Two more columns per digit say how much the generator copies its few training
images: ``nn gen/test``, the median pixel distance from a generated image to its nearest training image of that
digit over the same for a test image (below 1: generated images sit closer to the training images than new real
digits do), and ``spread gen/test``, the mean pairwise distance among generated images over that among test
images (below 1: less varied than real digits).

Every step is resumable: run it again after a kill and it continues (the data and a finished generator are
reused, the generator's training resumes from its checkpoint, ``mine`` from its stages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LONGTAIL = [sys.executable, "-m", "longtail"]


def run(args: list[str]) -> float:
    """Run a ``longtail`` command (its output shown as it comes); its wall time in seconds."""
    print("$ longtail " + " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([*LONGTAIL, *args], check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def rare_check(root: Path, per_class: int = 50) -> None:
    """Per digit: training images the generator saw, and the judge's accuracy on its unguided images."""
    import numpy as np
    import torch
    from PIL import Image

    from longtail.data.digits import DIGIT_NAMES, load_digits_images
    from longtail.data.imagefolder import scan_imagefolder
    from longtail.generate import generate, plan_jobs
    from longtail.jobs.common import GeneratorSpec, load_generator
    from longtail.models.tiny import class_prompt
    from longtail.models.tiny_data import load_images
    from longtail.train import SmallCNN, TrainConfig, fit, predict

    torch.manual_seed(0)
    data = root / "data"
    held = {p.stem for part in ("val", "test") for p in (data / part).rglob("*.png")}
    images, labels = load_digits_images()
    keep = [i for i in range(len(labels)) if f"{i:04d}" not in held]
    x = torch.stack([torch.from_numpy(np.array(Image.fromarray(images[i], "L").resize((16, 16), Image.BILINEAR)))
                     for i in keep]).unsqueeze(1).float() / 127.5 - 1
    names = sorted(DIGIT_NAMES)  # the generator's classes: folder names, sorted
    y = torch.tensor([names.index(DIGIT_NAMES[int(labels[i])]) for i in keep])
    judge = SmallCNN(1, 10, 16)
    fit(judge, (x, y), TrainConfig(epochs=30, lr=2e-3, batch_size=64, hflip=False, rotation=10.0), show=False)
    test = scan_imagefolder(data / "test", names)
    xt = load_images(test.paths, 16, 1, show=False).float() / 127.5 - 1
    test_acc = (predict(judge, xt).logits.argmax(1) == torch.tensor(test.labels)).float().mean().item()
    ldm, _, known = load_generator(GeneratorSpec(kind="embedded", model=str(root / "generator")), torch.device("cpu"))
    assert known == names, known
    out = generate(ldm, plan_jobs([per_class] * 10, lambda c, i: class_prompt(names[c])), num_steps=20,
                   cfg_scale=3.0, show=False, batch_size=100)
    pred = predict(judge, out.images.clamp(-1, 1)).logits.argmax(1)
    target = torch.arange(10).repeat_interleave(per_class)
    seen = json.loads((root / "generator" / "longtail_generator.json").read_text())["data"]["counts"]
    train = scan_imagefolder(data / "train", names)
    xs = load_images(train.paths, 16, 1, show=False).float() / 127.5 - 1
    ys, yt = torch.tensor(train.labels), torch.tensor(test.labels)
    flat = out.images.clamp(-1, 1).flatten(1)
    print(f"judge: trained on {len(keep)} images outside val/test (balanced), test accuracy {test_acc:.3f}")
    print(f"{'digit':<8}{'train images':>14}{'judge acc on generated':>24}{'nn gen/test':>13}{'spread gen/test':>17}")
    for name in DIGIT_NAMES:
        c = names.index(name)
        acc = (pred[target == c] == c).float().mean().item()
        gen, real, ref = flat[target == c], xt[yt == c].flatten(1), xs[ys == c].flatten(1)
        nn = torch.cdist(gen, ref).min(1).values.median() / torch.cdist(real, ref).min(1).values.median()
        spread = torch.pdist(gen).mean() / torch.pdist(real).mean()
        print(f"{name:<8}{seen[name]:>14}{acc:>24.3f}{nn.item():>13.2f}{spread.item():>17.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/digits", help="data, generator and runs go here")
    parser.add_argument("--val", action="store_true", help="evaluate on the validation split (choosing settings)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra mine --set")
    parser.add_argument("--rare-check", action="store_true", help="only the per-digit check of the generator")
    args = parser.parse_args()
    root = REPO / args.root
    if args.rare_check:
        rare_check(root)
        return
    data = root / "data"
    if not (data / "split.json").is_file():
        from longtail.data.digits import write_digits_lt

        write_digits_lt(data, seed=0)
    counts = json.loads((data / "split.json").read_text())["counts"]
    print(f"digits: train {counts['train']}, val {sum(counts['val'].values())}, test {sum(counts['test'].values())}")

    generator = root / "generator"
    if not (generator / "longtail_generator.json").is_file():
        wall = run(["train-generator", "--data", str(data / "train"), "--out", str(generator),
                    "--config", "configs/digits/generator.yaml", "--no-progress"])
        print(f"generator trained in {wall:.0f} s wall (this invocation)")
    meta = json.loads((generator / "longtail_generator.json").read_text())
    print(f"generator: {meta['train_images']} training images, {meta['image_size']} px, {meta['seconds']} s "
          f"(trainer's clock, last invocation), final UNet loss {meta['unet_final_loss']:.4f}")

    split = "val" if args.val else "test"
    out = root / ("mine_val" if args.val else "mine")
    seeds = "[" + args.seeds + "]"
    wall = run(["mine", "--config", "configs/digits/mine.yaml", "--set", f"out={out}",
                "--set", f"data.train={data / 'train'}", "--set", f"data.val={data / split}",
                "--set", f"generator.model={generator}", "--set", f"seeds={seeds}", "--no-progress",
                *[x for o in args.overrides for x in ("--set", o)]])
    print(f"mine: {wall:.0f} s wall; evaluated on the {split} split")
    print((out / "summary.txt").read_text())


if __name__ == "__main__":
    main()
