"""Build the judges and the nuisance-mode detector that ship in ``src/longtail/assets/`` (float32 safetensors).

Each is trained exactly as a mine run trains it (``judge.spec: train``: ``train_judge`` for 3 epochs, seed 10000,
on the full Fashion-MNIST training set as the generator saw it; the detector: ``train_mode_detector`` for 3 epochs),
so ``judge.spec: shipped`` and the shipped detector give a run the same models, bit for bit (the training is
deterministic on the CPU: a rerun gave identical weights), without the minutes of training.

    python scripts/ship_detectors.py                       # train all three here (about 10 min on 2 cores)
    python scripts/ship_detectors.py --from-run runs/demo  # copy the ones a run trained (nuisance judge, detector)

``--from-run`` takes ``<run>/judge`` for the run's generator and ``<run>/modes/detector``; the run's config must
have ``judge.spec: train`` with 3 epochs, so what ships is what the recipe makes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file

from longtail.data.datasets import FASHION_MNIST_CLASSES
from longtail.evaluation.judge import SHIPPED_JUDGES, fashion_mnist_train, save_judge, train_judge
from longtail.evaluation.modes import DETECTOR_CLASSES, SHIPPED_DETECTOR, train_mode_detector
from longtail.jobs.mine_config import MineConfig
from longtail.jobs.stages import MODE_DETECTOR_EPOCHS, generator_nuisance
from longtail.models.tiny import ASSETS_ROOT

JUDGE_EPOCHS, JUDGE_SEED = 3, 10_000  # as configs/demo.yaml's judge and stages.stage_judge


def install(source: Path, target: Path) -> None:
    """Copy a saved judge directory to ``target`` as it is (float32: bit for bit what training gives)."""
    load_file(str(source / "classifier.safetensors"))  # readable before anything is replaced
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    print(f"{target}: {sum(f.stat().st_size for f in target.iterdir()) / 1e6:.2f} MB")


def train_all(data_dir: str | None) -> None:
    for model, name in SHIPPED_JUDGES.items():
        cfg = MineConfig()
        cfg.generator.model = model
        modes = generator_nuisance(cfg)
        images, labels = fashion_mnist_train(data_dir, *(modes or (None, 0)))
        judge = train_judge(images, labels, len(FASHION_MNIST_CLASSES), epochs=JUDGE_EPOCHS, seed=JUDGE_SEED,
                            show=True)
        with tempfile.TemporaryDirectory() as tmp:
            save_judge(judge, Path(tmp) / name, list(FASHION_MNIST_CLASSES))
            install(Path(tmp) / name, ASSETS_ROOT / name)
    images, _ = fashion_mnist_train(data_dir)
    detector = train_mode_detector(images, epochs=MODE_DETECTOR_EPOCHS, show=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_judge(detector, Path(tmp) / "d", list(DETECTOR_CLASSES))
        install(Path(tmp) / "d", SHIPPED_DETECTOR)


def from_run(run: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    judge = config.get("judge") or {}
    if judge.get("spec") != "train" or judge.get("epochs") != JUDGE_EPOCHS:
        raise SystemExit(f"{run}: its judge was not trained by the recipe (judge.spec train, {JUDGE_EPOCHS} epochs)")
    model = (config.get("generator") or {}).get("model") or "clean"
    install(run / "judge", ASSETS_ROOT / SHIPPED_JUDGES[model])
    if (run / "modes" / "detector" / "classifier.json").is_file():
        install(run / "modes" / "detector", SHIPPED_DETECTOR)
    print(json.dumps({"from": str(run), "generator": model}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", type=Path, action="append", default=[],
                        help="copy a run's judge (and detector) instead of training; may repeat")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST files (default: the Debian package)")
    args = parser.parse_args()
    if args.from_run:
        for run in args.from_run:
            from_run(run)
    else:
        train_all(args.data_dir)


if __name__ == "__main__":
    main()
