"""The HTML report of a synthetic run directory (the demo's schema), checked as HTML and in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from longtail.config import dump_config
from longtail.data.store import SyntheticStore
from longtail.demo import DemoConfig, DemoData, MiningSection, format_summary, save_grid, summarize
from longtail.evaluation.distribution import distribution_report
from longtail.report import (
    SECTIONS,
    Section,
    dense_rank,
    grid_geometry,
    load_run,
    plot_distribution,
    plot_roc,
    shrink_png,
    write_report,
)

CLASSES = ["alpha", "beta", "gamma", "delta"]
GROUPS = ["many", "many", "medium", "few"]
SIGNALS = ["entropy", "total"]
WEIGHTS = [0.0, 0.5, 2.0]
CONDITIONS = ["none", "unguided", "ltg"]
ROUNDS = 2
CHROMIUM = Path("/usr/bin/chromium")


def _accuracy(rng: np.random.Generator) -> dict:
    per_class = rng.uniform(0.2, 0.9, len(CLASSES)).tolist()
    groups = {
        g: float(np.mean([a for a, gg in zip(per_class, GROUPS, strict=True) if gg == g]))
        for g in set(GROUPS)
    }
    return {"top1": float(np.mean(per_class)), "per_class": per_class, **groups}


def _base_metrics(rng: np.random.Generator) -> dict:
    det = {
        s: {
            "auroc_rare": rng.uniform(0.5, 0.9),
            "auroc_hard": rng.uniform(0.5, 0.9),
            "acc_above_q90": rng.uniform(0.2, 0.5),
            "acc_below_q90": rng.uniform(0.6, 0.9),
        }
        for s in SIGNALS
    }
    return {**_accuracy(rng), "detection": det, "seconds": 1.0}


def _test_scores(path: Path, rng: np.random.Generator, n: int = 80) -> None:
    labels = torch.from_numpy(rng.integers(0, len(CLASSES), n))
    preds = torch.where(torch.from_numpy(rng.random(n) < 0.7), labels, (labels + 1) % len(CLASSES))
    hard = (preds != labels).float()
    tensors = {f"signal/{s}": (hard + torch.from_numpy(rng.normal(0, 0.7, n))).float() for s in SIGNALS}
    tensors.update(labels=labels, preds=preds, rare=torch.tensor([GROUPS[int(y)] == "few" for y in labels]))
    save_file(tensors, str(path))


def _sweep(root: Path, rng: np.random.Generator) -> dict:
    points = [
        {
            "signal": s,
            "weight": w,
            "mean_signal": 1.0 + w * (0.3 if s == "total" else 0.2),
            "mean_p_class": 0.9 - 0.2 * w,
            "accuracy": 0.95 - 0.2 * w,
            "n": 16,
            "seconds": 0.5 + w,
            "nonfinite": 0,
        }
        for w in WEIGHTS
        for s in SIGNALS
    ]
    choices = {
        s: {
            "signal": s,
            "weight": 0.5,
            "reason": f"w=0.5 raised {s} with P(class) at 0.8 x unguided",
            "baseline_signal": 1.0,
            "baseline_p_class": 0.9,
        }
        for s in SIGNALS
    }
    labels = torch.arange(len(CLASSES)).repeat_interleave(2)
    images = {
        w: torch.rand(len(labels), 1, 12, 12, generator=torch.Generator().manual_seed(int(w * 10))) * 2 - 1
        for w in WEIGHTS
    }
    for s in SIGNALS:
        save_grid(images, labels, root / "sweep" / f"grid_{s}.png", per_class=2)
    timing = {"unguided_img_per_s": 32.0, "guided_img_per_s": 8.0, "slowdown": 4.0}
    result = {"points": points, "choices": choices, "timing": timing, "grid_weights": WEIGHTS}
    (root / "sweep" / "sweep.json").write_text(json.dumps(result))
    return result


def _mining(root: Path, seed: int, rng: np.random.Generator, base: dict) -> dict[str, list[dict]]:
    out = {}
    for cond in CONDITIONS:
        history = [
            {
                "round": 0,
                "synthetic": 0,
                **{k: base[k] for k in ("top1", "per_class", "many", "medium", "few")},
            }
        ]
        history += [
            {"round": r, "synthetic": 8 * r, "train_loss": 1.0 / r, **_accuracy(rng)}
            for r in range(1, ROUNDS + 1)
        ]
        for row in history:
            d = root / f"seed_{seed}" / "mining" / cond / f"round_{row['round']}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps(row))
        if cond != "none":
            store = SyntheticStore(root / f"seed_{seed}" / "mining" / cond / "synthetic")
            records = [
                {
                    "id": f"r{r}_c{c}_{i}",
                    "class_id": c,
                    "class_name": CLASSES[c],
                    "round": r,
                    "weight": 0.5 if cond == "ltg" else 0.0,
                    "signal_name": "total",
                    "signal": rng.uniform(0.5, 1.5),
                    "p_class": rng.uniform(0.3, 0.9),
                    "pred": c,
                }
                for r in range(1, ROUNDS + 1)
                for c in range(len(CLASSES))
                for i in range(2)
            ]
            store.add(rng.integers(0, 255, (len(records), 12, 12), dtype=np.uint8), records)
        out[cond] = history
    return out


def make_run(root: Path, seeds: tuple[int, ...] = (0, 1), optional: bool = True) -> Path:
    """A complete small run directory with the demo's file layout and JSON schemas (random numbers)."""
    rng = np.random.default_rng(0)
    cfg = DemoConfig(
        out=str(root), seeds=list(seeds), mining=MiningSection(conditions=CONDITIONS, rounds=ROUNDS)
    )
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    base, mining = {}, {}
    for seed in seeds:
        (root / f"seed_{seed}" / "base").mkdir(parents=True)
        base[seed] = _base_metrics(rng)
        (root / f"seed_{seed}" / "base" / "metrics.json").write_text(json.dumps(base[seed]))
        _test_scores(root / f"seed_{seed}" / "base" / "test_scores.safetensors", rng)
        mining[seed] = _mining(root, seed, rng, base[seed])
    sweep = _sweep(root, rng)
    data = DemoData(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), [100] * len(CLASSES),
                    ['many'] * len(CLASSES))
    summary = summarize(cfg, data, base, mining, sweep, 0.5)
    summary["class_names"] = list(CLASSES)  # the fake run's classes, not Fashion-MNIST's
    (root / "metrics.json").write_text(json.dumps(summary))
    (root / "summary.txt").write_text(format_summary(summary) + "\n")
    if optional:
        _optional_files(root, seeds)
    return root


def _distribution(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(20)
    real = labels.float().unsqueeze(1) * 5 + torch.randn(len(labels), 3, generator=g)
    fake = labels.float().unsqueeze(1) * 5 + torch.randn(len(labels), 3, generator=g)
    return distribution_report(real, labels, fake, labels, CLASSES, k=3)


def _optional_files(root: Path, seeds: tuple[int, ...]) -> None:
    """distribution.json, trajectory.json and introspection/ in the layouts the demo and tools write."""
    conditions = {c: {str(s): _distribution(s) for s in seeds} for c in ("unguided", "ltg")}
    (root / "distribution.json").write_text(
        json.dumps({"features": "base classifier, input of its head", "conditions": conditions})
    )
    rows = [
        {
            "step": i,
            "fraction": i / 4,
            "timestep": 999 - 250 * i,
            "fid_predicted_clean": 40.0 / (i + 1),
            "fid_noisy": 300.0 / (i + 1),
            "signal_w0": 1.0,
            "signal_guided": 1.0 + 0.1 * i,
        }
        for i in range(4)
    ]
    (root / "trajectory.json").write_text(
        json.dumps({"signal": "total", "weight": 0.5, "images": 8, "rows": rows})
    )
    (root / "introspection").mkdir()
    (root / "introspection" / "keywords.json").write_text(
        json.dumps(
            {
                "alpha": ["folded", "side view"],
                "delta": [{"caption": "a delta, cut off", "keywords": ["cut", "edge"]}],
            }
        )
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "run")


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def _decode_pngs(sources: list[str]) -> list[Image.Image]:
    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.format == "PNG" and min(image.size) > 10
        images.append(image)
    return images


def test_full_run_renders_every_section(full_run, tmp_path):
    out = write_report(full_run, tmp_path / "report.html")
    html = out.read_text()
    for section in SECTIONS:
        assert f'<section id="{section.id}">' in html
    assert 'class="note missing"' not in html and 'class="note error"' not in html
    # bars, rounds, ROC, sweep, 2 grids, synthetic montage, distribution, trajectory
    images = _decode_pngs(_img_sources(html))
    assert len(images) == 9
    assert "guided by <b>total</b>" in html and "w=0.5 raised total" in html  # grid caption, weight reason
    assert (
        "alpha" in html
        and "side view" in html
        and "FID: synthetic within class / real between classes" in html
    )
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert write_report(full_run) == full_run / "report.html"


def test_grid_layout_is_recognised(full_run):
    image = Image.open(full_run / "sweep" / "grid_total.png")
    assert grid_geometry(*image.size, rows=len(CLASSES), columns=len(WEIGHTS)) == (12, 2)
    assert load_run(full_run).class_names == CLASSES  # from the synthetic manifests


def test_roc_handles_scores_far_outside_unit_range():
    scores = torch.tensor([20.0, 21.0, 22.0, 23.0])  # a sigmoid would tie these in float32
    assert torch.equal(dense_rank(scores), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    labels = torch.tensor([0, 0, 1, 1])
    tensors = {
        "signal/energy": scores,
        "labels": labels,
        "preds": torch.tensor([0, 0, 0, 0]),
        "rare": labels.bool(),
    }
    _, aurocs = plot_roc(tensors)
    assert aurocs["energy"] == {"rare": 1.0, "hard": 1.0}


def test_many_classes_and_large_images_stay_light():
    names = [f"c{i}" for i in range(40)]
    rep = {"per_class": {n: {"fid": 1.0, "between_real": {"fid_mean": 5.0}} for n in names}}
    assert _decode_pngs(
        [_uri(plot_distribution({"ltg": [rep]}, {"ltg": "LTG"}))]
    )  # scatter, not 40 bar groups
    buf = io.BytesIO()
    Image.new("RGB", (3000, 200), "white").save(buf, format="PNG")
    assert Image.open(io.BytesIO(shrink_png(buf.getvalue(), 1600))).size == (1600, 107)


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_partial_run_says_what_is_missing(tmp_path):
    root = tmp_path / "partial"
    make_run(root, seeds=(0,), optional=False)
    for gone in ("sweep", "metrics.json", "summary.txt"):
        path = root / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(root / "seed_0" / "mining")
    html = write_report(root).read_text()
    missing = re.findall(r'<section id="([^"]+)"><h2>[^<]*</h2><p class="note missing">', html)
    assert set(missing) == {"rounds", "sweep", "grids", "synthetic"}
    assert "summary.txt" in html and "sweep/sweep.json" in html
    assert '<section id="accuracy">' in html and "base (long-tailed real data only)" in html
    assert '<section id="distribution">' not in html  # optional sections vanish when absent
    assert 'class="note error"' not in html
    _decode_pngs(_img_sources(html))


def test_optional_files_in_other_layouts(tmp_path):
    root = make_run(tmp_path / "run", seeds=(0,), optional=False)
    (root / "distribution.json").write_text(json.dumps(_distribution(0)))  # one bare distribution_report
    (root / "trajectory.json").write_text(json.dumps({"step": [0, 1, 2], "fid_zt": [9.0, 5.0, 1.0]}))
    html = write_report(root).read_text()
    assert '<section id="distribution">' in html and '<section id="trajectory">' in html
    assert "Unrecognised" not in html and 'class="note error"' not in html
    (root / "trajectory.json").write_text(json.dumps({"something": "else"}))
    assert "Unrecognised <code>trajectory.json</code>" in write_report(root).read_text()


def test_missing_or_empty_run_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path / "empty")


def test_sections_are_pluggable_and_isolated(full_run, tmp_path):
    def custom(run):
        return f"<p>seeds here: {run.seeds}</p>"

    def broken(run):
        raise KeyError("schema drift")

    html = write_report(
        full_run,
        tmp_path / "r.html",
        sections=[Section("custom", "Custom", custom), Section("broken", "Broken", broken)],
    ).read_text()
    assert "seeds here: [0, 1]" in html
    assert 'class="note error"' in html and "schema drift" in html


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (CI installs it via apt)"
)
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    page = write_report(full_run, tmp_path / "report.html")
    flags = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.is_file(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and pixels.mean() < 250  # not blank, not all white

    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180
    ).stdout
    assert "<section" in dom
    sources = _img_sources(dom)
    assert len(sources) == 9
    _decode_pngs(sources)
