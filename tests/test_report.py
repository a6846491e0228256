"""The HTML report of synthetic run directories (a mine / demo run, a ``longtail generate`` output, a
``longtail calibrate`` output), checked as HTML and in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html import unescape as html_unescape
from pathlib import Path
from urllib.parse import unquote

import jinja2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from helpers import chromium_dom
from longtail.calibrate import save_grid
from longtail.conditions import condition_label
from longtail.data.store import SyntheticStore
from longtail.evaluation.distribution import distribution_report
from longtail.evaluation.metrics import dense_rank
from longtail.evaluation.stats import mean_std, paired_difference, paired_table
from longtail.report import (
    SECTIONS,
    Section,
    build_html,
    grid_geometry,
    load_run,
    plot_distribution,
    plot_roc,
    shrink_png,
    write_report,
)
from longtail.report.cells import fmt_duration
from longtail.report.gallery import build_gallery, gallery_data

CLASSES = ["alpha", "beta", "gamma", "delta"]
GROUPS = ["many", "many", "medium", "few"]
SIGNALS = ["entropy", "total"]
WEIGHTS = [0.0, 0.5, 2.0]
CONDITIONS = ["none", "unguided", "ltg", "ltg:entropy@2"]  # the last one's folder is ltg_entropy_w2
GUIDANCE = {"ltg": {"signal": "total", "weight": 0.5}, "ltg:entropy@2": {"signal": "entropy", "weight": 2.0}}
GROUP_KEYS = ("top1", "many", "medium", "few")
ROUNDS = 2
CHROMIUM = Path("/usr/bin/chromium")
MISSING = re.compile(r'<section id="([^"]+)"><h2>[^<]*</h2><p class="note missing">')


def _accuracy(rng: np.random.Generator) -> dict:
    per_class = rng.uniform(0.2, 0.9, len(CLASSES)).tolist()
    groups = {
        g: float(np.mean([a for a, gg in zip(per_class, GROUPS, strict=True) if gg == g]))
        for g in set(GROUPS)
    }
    return {"top1": float(np.mean(per_class)), "per_class": per_class, **groups}


def _base_metrics(rng: np.random.Generator) -> dict:
    keys = ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")
    lows, highs = (0.5, 0.5, 0.2, 0.6), (0.9, 0.9, 0.5, 0.9)
    det = {s: {k: rng.uniform(lo, hi) for k, lo, hi in zip(keys, lows, highs, strict=True)} for s in SIGNALS}
    return {**_accuracy(rng), "detection": det, "seconds": 1.0}


def _test_scores(path: Path, rng: np.random.Generator, n: int = 80) -> None:
    labels = torch.from_numpy(rng.integers(0, len(CLASSES), n))
    preds = torch.where(torch.from_numpy(rng.random(n) < 0.7), labels, (labels + 1) % len(CLASSES))
    hard = (preds != labels).float()
    tensors = {f"signal/{s}": (hard + torch.from_numpy(rng.normal(0, 0.7, n))).float() for s in SIGNALS}
    tensors.update(labels=labels, preds=preds, rare=torch.tensor([GROUPS[int(y)] == "few" for y in labels]))
    save_file(tensors, str(path))


def _sweep_result(class_names: list[str]) -> dict:
    """What ``longtail.calibrate.calibrate`` returns (``sweep/sweep.json`` of a run, ``calibration.json``)."""
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
    timing = {"unguided_img_per_s": 32.0, "guided_img_per_s": 8.0, "slowdown": 4.0}
    return {"points": points, "choices": choices, "timing": timing, "grid_weights": WEIGHTS}


def _grids(folder: Path, num_classes: int) -> None:
    """``grid_<signal>.png`` as the sweep writes them (``longtail.calibrate.save_grid``)."""
    labels = torch.arange(num_classes).repeat_interleave(2)
    images = {
        w: torch.rand(len(labels), 1, 12, 12, generator=torch.Generator().manual_seed(int(w * 10))) * 2 - 1
        for w in WEIGHTS
    }
    for s in SIGNALS:
        save_grid(images, labels, folder / f"grid_{s}.png", per_class=2)


def _sweep(root: Path) -> dict:
    _grids(root / "sweep", len(CLASSES))
    result = _sweep_result(CLASSES)
    (root / "sweep" / "sweep.json").write_text(json.dumps(result))
    return result


def _store_records(cond: str, rng: np.random.Generator) -> list[dict]:
    weight = (GUIDANCE.get(cond) or {}).get("weight", 0.0)
    return [
        {
            "id": f"r{r}_c{c}_{i}",
            "class_id": c,
            "class_name": CLASSES[c],
            "round": r,
            "weight": weight,
            "signal_name": "total",
            "signal": rng.uniform(0.5, 1.5),
            "p_class": rng.uniform(0.3, 0.9),
            "pred": c,
        }
        for r in range(1, ROUNDS + 1)
        for c in range(len(CLASSES))
        for i in range(2)
    ]


def _mining(root: Path, seed: int, rng: np.random.Generator, start: dict) -> dict[str, list[dict]]:
    """``seed_<s>/mining/<Condition.dirname>/round_<r>/metrics.json`` and the synthetic stores."""
    out = {}
    for cond in CONDITIONS:
        folder = root / f"seed_{seed}" / "mining" / cond.replace(":", "_").replace("@", "_w")
        history = [{"round": 0, "synthetic": 0, **{k: start[k] for k in (*GROUP_KEYS, "per_class")}}]
        history += [
            {"round": r, "synthetic": 8 * r, "train_loss": 1.0 / r, **_accuracy(rng)}
            for r in range(1, ROUNDS + 1)
        ]
        for row in history:
            (folder / f"round_{row['round']}").mkdir(parents=True, exist_ok=True)
            (folder / f"round_{row['round']}" / "metrics.json").write_text(json.dumps(row))
        if cond != "none":
            records = _store_records(cond, rng)
            images = rng.integers(0, 255, (len(records), 12, 12), dtype=np.uint8)
            SyntheticStore(folder / "synthetic").add(images, records)
        out[cond] = history
    return out


def _summary(
    seeds: tuple[int, ...], base: dict[int, dict], mining: dict, sweep: dict | None, paired: bool = True
) -> dict:
    """``metrics.json`` with the keys ``longtail.demo.summarize`` writes."""
    finals = {c: [mining[s][c][-1] for s in seeds] for c in CONDITIONS}
    summary = {
        "seeds": list(seeds),
        "class_names": list(CLASSES),
        "train_counts": [100, 100, 30, 5],
        "groups": list(GROUPS),
        "condition_guidance": GUIDANCE,
        "conditions": {c: {k: mean_std([f[k] for f in fs]) for k in GROUP_KEYS} for c, fs in finals.items()},
        "per_seed": {str(s): {"mining": mining[s], **({"base": base[s]} if base else {})} for s in seeds},
        "ltg": GUIDANCE["ltg"],
    }
    if base:
        summary["base"] = {k: mean_std([base[s][k] for s in seeds]) for k in GROUP_KEYS}
        summary["detection"] = {
            n: {
                k: mean_std([base[s]["detection"][n][k] for s in seeds])
                for k in base[seeds[0]]["detection"][n]
            }
            for n in SIGNALS
        }
    if sweep is not None:
        summary["sweep"] = sweep
    if paired:
        per_seed_finals = {s: {c: history[-1] for c, history in mining[s].items()} for s in seeds}
        summary["paired"] = {"baseline": "unguided", "table": paired_table(per_seed_finals, "unguided")}
    return summary


def _summary_text(summary: dict) -> str:
    lines = [f"mean ± std over seeds {summary['seeds']}", f"{'condition':<26}{'top-1':>14}"]
    for cond, m in summary["conditions"].items():
        label = condition_label(cond, summary["condition_guidance"].get(cond))
        lines.append(f"{label:<26}{m['top1']['mean']:>14.3f}")
    return "\n".join(lines) + "\n"


def make_run(
    root: Path,
    seeds: tuple[int, ...] = (0, 1),
    optional: bool = True,
    base_stage: bool = True,
    paired: bool = True,
) -> Path:
    """A small run directory in the demo's / ``longtail mine``'s layout and JSON schemas (random numbers).

    ``base_stage=False``: a mine run that started from a trained classifier (no ``seed_<s>/base/``, no sweep).
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    config = {"out": str(root), "seeds": list(seeds), "mining": {"conditions": CONDITIONS, "rounds": ROUNDS}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    base, mining = {}, {}
    for seed in seeds:
        start = _base_metrics(rng)
        if base_stage:
            (root / f"seed_{seed}" / "base").mkdir(parents=True)
            base[seed] = start
            (root / f"seed_{seed}" / "base" / "metrics.json").write_text(json.dumps(start))
            _test_scores(root / f"seed_{seed}" / "base" / "test_scores.safetensors", rng)
        mining[seed] = _mining(root, seed, rng, start)
    sweep = _sweep(root) if base_stage else None
    summary = _summary(seeds, base, mining, sweep, paired)
    if optional:
        summary.update(NUISANCE_KEYS)
    (root / "metrics.json").write_text(json.dumps(summary))
    (root / "summary.txt").write_text(_summary_text(summary))
    if optional:
        _optional_files(root, seeds)
    return root


def _distribution(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(20)
    real = labels.float().unsqueeze(1) * 5 + torch.randn(len(labels), 3, generator=g)
    fake = labels.float().unsqueeze(1) * 5 + torch.randn(len(labels), 3, generator=g)
    return distribution_report(real, labels, fake, labels, CLASSES, k=3)


# efficiency.json as ``stage_efficiency`` writes it (fewer keys per paired difference); a size without a mean
EFFICIENCY = {
    "sizes": [5, 25],
    "epochs": 6,
    "seeds": [0, 1, 2],
    "conditions": ["unguided", "ltg"],
    "table": {
        "unguided": {
            "5": {"few": {"mean": 0.61, "std": 0.02, "n": 3}, "top1": {"mean": 0.8, "std": 0.01, "n": 3}},
            "25": {"few": {"mean": None, "std": None, "n": 0}, "top1": {"mean": 0.82, "std": 0.01, "n": 3}},
        },
        "ltg": {
            "5": {"few": {"mean": 0.64, "std": 0.03, "n": 3}, "top1": {"mean": 0.81, "std": 0.02, "n": 3}},
            "25": {"few": {"mean": 0.72, "std": 0.01, "n": 3}, "top1": {"mean": 0.83, "std": 0.01, "n": 3}},
        },
    },
    "paired": {
        "5": {"ltg": {"few": {"mean": 0.03, "ci": [-0.01, 0.07], "wins": 2, "losses": 1, "n": 3, "level": 0.95}}},
        "25": {"ltg": {"few": {"mean": None, "ci": None, "wins": 0, "losses": 0, "n": 0, "level": 0.95}}},
    },
}


def _ms(mean: float, std: float, n: int = 2) -> dict:
    return {"mean": mean, "std": std, "n": n}


# metrics.json's keys from the nuisance testbed (`longtail mine`, data.nuisance / nuisance_eval), and timing
NUISANCE_KEYS = {
    "splits": {
        "nuisance:all": {"none": _ms(0.412, 0.01), "unguided": _ms(0.456, 0.02), "ltg": _ms(0.478, 0.03),
                         "ltg:entropy@2": _ms(0.401, 0.004)},
        "nuisance:rotate": {"none": _ms(0.2, 0.01), "unguided": _ms(0.16, 0.02), "ltg": _ms(0.1234, 0.0056),
                            "ltg:entropy@2": _ms(0.19, 0.02)},
    },
    # the mode detector's shares; classes in the order of the synthetic images, not the run's
    "mode_shares": {
        "unguided": {"all": {"rotate": 0.0753, "invert": 0.044}, "beta": {"rotate": 0.1, "invert": 0.0},
                     "alpha": {"rotate": 0.05, "invert": 0.088}},
        "ltg": {"all": {"rotate": 0.1294, "invert": 0.0421}, "beta": {"rotate": 0.2, "invert": 0.0},
                "alpha": {"rotate": 0.0588, "invert": 0.0842}},
    },
    "mode_detector": {
        "accuracy": 0.9942,
        "clean_false_alarm": 0.0024,
        "recall": {"rotate": 0.9888, "invert": 1.0},
        "n": 10000,
    },
    "stage_seconds": {"base": 60.0, "sweep": 30.0, "mining ltg": 90.0},
    "seconds": 200.0,
}


def _optional_files(root: Path, seeds: tuple[int, ...]) -> None:
    """efficiency.json, distribution.json, trajectory.json and introspection/ in the layouts the demo and tools
    write."""
    (root / "efficiency.json").write_text(json.dumps(EFFICIENCY))
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


GENERATED_CLASSES = ["shirt", "<b>x</b>"]


def make_generate_output(root: Path) -> Path:
    """A ``longtail generate`` output: config.yaml, manifest.csv, ``<class>/<id>.png``; unguided and w = 2."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    config = {"out": str(root), "guidance": {"signal": "total", "weight": 2.0}, "per_class": 3, "seed": 0}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        {
            "id": f"w{w:g}_c{c}_{i}",
            "class_id": c,
            "class_name": name,
            "index": i,
            "seed": i,
            "prompt": f"a photo of a {name}",
            "weight": w,
            "signal_name": "total",
            "signal": 1.0 + w * rng.random(),
            "p_class": 0.9 - 0.1 * w,
            "pred": c if i else 1 - c,
            "model": "tiny:shipped",
            "num_steps": 2,
            "cfg_scale": 1.0,
            "seconds": 0.25,
        }
        for w in (0.0, 2.0)
        for c, name in enumerate(GENERATED_CLASSES)
        for i in range(3)
    ]
    store = SyntheticStore(root)
    store.add(rng.integers(0, 255, (len(records), 16, 16, 3), dtype=np.uint8), records)
    store.merge()
    return root


def make_calibrate_output(root: Path) -> Path:
    """A ``longtail calibrate`` output: config.yaml, calibration.json and ``grid_<signal>.png``."""
    root.mkdir(parents=True)
    config = {
        "out": str(root),
        "signals": SIGNALS,
        "weights": WEIGHTS[1:],
        "per_class": 2,
        "min_p_ratio": 0.5,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    _grids(root, len(CLASSES))
    (root / "calibration.json").write_text(json.dumps({**_sweep_result(CLASSES), "class_names": CLASSES}))
    return root


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


def _section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', html)


def test_full_run_renders_every_section(full_run, tmp_path):
    out = write_report(full_run, tmp_path / "report.html")
    html = out.read_text()
    for section in SECTIONS:
        assert (f'<section id="{section.id}">' in html) == ("mine" in section.kinds), section.id
    assert 'class="note missing"' not in html and 'class="note error"' not in html
    # bars, efficiency, rounds, ROC, sweep, 2 grids, synthetic montage, distribution, trajectory
    images = _decode_pngs(_img_sources(html))
    assert len(images) == 10
    assert "guided by <b>total</b>" in html and "w=0.5 raised total" in html  # grid caption, weight reason
    assert (
        "alpha" in html
        and "side view" in html
        and "FID: synthetic within class / real between classes" in html
    )
    assert (
        "+ LTG (entropy, w=2)" in html and "ltg:entropy@2" in html
    )  # folder ltg_entropy_w2 -> its condition
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert write_report(full_run) == full_run / "report.html"


def test_condition_folders_map_back_to_condition_texts(full_run):
    run = load_run(full_run)
    assert run.kind == "mine" and run.seeds == [0, 1]
    assert run.conditions == CONDITIONS  # in the configured order, by text, not by folder name
    assert (
        run.store_dir(0, "ltg:entropy@2") == full_run / "seed_0" / "mining" / "ltg_entropy_w2" / "synthetic"
    )
    assert [r["round"] for r in run.mining[1]["ltg:entropy@2"]] == list(range(ROUNDS + 1))


def test_grid_layout_is_recognised(full_run):
    image = Image.open(full_run / "sweep" / "grid_total.png")
    assert grid_geometry(*image.size, rows=len(CLASSES), columns=len(WEIGHTS)) == (12, 2)
    assert load_run(full_run).class_names == CLASSES


def test_class_names_come_from_the_synthetic_manifests(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root)
    summary = json.loads((root / "metrics.json").read_text())
    del summary["class_names"]
    (root / "metrics.json").write_text(json.dumps(summary))
    assert load_run(root).class_names == CLASSES


def test_mine_run_with_a_given_classifier(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root)
    config = yaml.safe_load((root / "config.yaml").read_text())
    (root / "config.yaml").write_text(yaml.safe_dump({**config, "base": {"epochs": 0}}))
    summary = json.loads((root / "metrics.json").read_text())
    del summary["class_names"]
    (root / "metrics.json").write_text(json.dumps({**summary, "evaluated_on": "val split"}))
    (root / "class_names.json").write_text(json.dumps(["a", "b", "c", "d"]))  # what `longtail mine` writes
    assert load_run(root).class_names == ["a", "b", "c", "d"]
    html = write_report(root).read_text()
    assert "base (the given classifier)" in html and "base (long-tailed real data only)" not in html
    assert "Test accuracy (val split)" in html


def _section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, section_id
    return match.group(1)


def test_paired_section_shows_the_differences(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root)
    summary = json.loads((root / "metrics.json").read_text())
    unguided = {0: 0.4, 1: 0.5, 2: 0.5}
    table = {
        # differences 0.1, 0.2, 0.1: mean 0.1333, sd 0.05774, half width 4.302653 * 0.05774 / sqrt(3) = 0.1434
        "ltg": {"few": paired_difference({0: 0.5, 1: 0.7, 2: 0.6}, unguided)},
        # one seed (the others lack this condition): no interval
        "ltg:entropy@2": {"few": paired_difference({0: 0.3}, unguided)},
        # 0, -0.2, 0: mean -0.0667, sd 0.1155, half width 0.2868
        "none": {"few": paired_difference({0: 0.4, 1: 0.3, 2: 0.5}, unguided)},
    }
    summary["paired"] = {"baseline": "unguided", "table": json.loads(json.dumps(table))}
    (root / "metrics.json").write_text(json.dumps(summary))
    body = _section(write_report(root).read_text(), "paired")
    assert "<b>unguided synthetic</b>" in body and "95% Student-t" in body
    rows = re.findall(
        r"<tr><td>([^<]*)</td><td class=\"num\">([^<]*)</td><td class=\"num\">(\d+)</td></tr>", body
    )
    assert rows == [
        ("LTG (total, w=0.5)", "+0.133 [-0.010, +0.277] (3/0)", "3"),
        ("LTG (entropy, w=2)", "-0.100 (0/1)", "1"),
        ("fine-tune, no synth", "-0.067 [-0.354, +0.220] (0/1, 2 tied)", "3"),
    ]
    assert "<th>Few</th>" in body and "<th>top-1</th>" not in body


def test_paired_section_follows_the_metrics_key(full_run, tmp_path):
    html = write_report(full_run, tmp_path / "with.html").read_text()
    body = _section(html, "paired")
    for label in ("LTG (total, w=0.5)", "LTG (entropy, w=2)", "fine-tune, no synth"):
        assert f"<td>{label}</td>" in body
    assert "<td>unguided synthetic</td>" not in body  # the baseline is no row
    assert re.findall(r"<th>([^<]*)</th>", body) == [
        "condition",
        "Few",
        "Medium",
        "top-1",
        "seeds",
    ]
    assert len(re.findall(r"\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\] \(\d/\d", body)) == 9  # 3 conditions x 3
    root = make_run(tmp_path / "plain", seeds=(0, 1), optional=False, paired=False)
    html = write_report(root).read_text()
    assert '<section id="paired">' not in html and 'href="#paired"' not in html
    assert '<section id="accuracy">' in html and 'class="note error"' not in html


EFFICIENCY_SECTION = next(s for s in SECTIONS if s.id == "efficiency")


def _efficiency_html(root: Path) -> str:
    """The page with the efficiency section alone (``""`` when it is left out)."""
    html = build_html(load_run(root), [EFFICIENCY_SECTION])
    return _section(html, "efficiency") if '<section id="efficiency">' in html else ""


def _rows(body: str) -> list[tuple[str, ...]]:
    """The body rows of a table: the texts of their cells."""
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1])
    return [tuple(re.findall(r"<td[^>]*>([^<]*)</td>", row)) for row in rows]


def test_efficiency_section_shows_the_curve_and_paired_differences(full_run):
    body = _efficiency_html(full_run)
    assert len(_decode_pngs(_img_sources(body))) == 1
    assert "then 6 fine-tuning epochs; mean over 3 seed(s)" in body and "a quarter" in body
    tables = re.findall(r"<table>(.*?)</table>", body, re.S)
    assert len(tables) == 2
    assert re.findall(r"<th>([^<]*)</th>", tables[0]) == ["condition", "n = 5", "n = 25"]
    assert _rows(tables[0]) == [
        ("unguided synthetic", "0.610 ± 0.020", "–"),  # a null mean is a dash
        ("LTG (total, w=0.5)", "0.640 ± 0.030", "0.720 ± 0.010"),
    ]
    assert "<b>unguided synthetic</b>" in body and "95% Student-t" in body
    assert _rows(tables[1]) == [("LTG (total, w=0.5)", "+0.030 [-0.010, +0.070] (2/1)", "–")]


def test_efficiency_section_is_left_out_without_its_file(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root)
    (root / "efficiency.json").unlink()
    assert load_run(root).efficiency is None and _efficiency_html(root) == ""
    summary = json.loads((root / "metrics.json").read_text())  # `longtail mine` also copies it here
    (root / "metrics.json").write_text(json.dumps({**summary, "efficiency": {**EFFICIENCY, "paired": {}}}))
    body = _efficiency_html(root)
    assert "0.640 ± 0.030" in body and len(re.findall(r"<table>", body)) == 1  # no unguided: no paired table


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
    assert set(MISSING.findall(html)) == {"rounds", "sweep", "grids", "synthetic"}
    assert "summary.txt" in html and "sweep/sweep.json" in html
    assert '<section id="accuracy">' in html and "base (long-tailed real data only)" in html
    assert '<section id="distribution">' not in html  # optional sections vanish when absent
    assert 'class="note error"' not in html
    _decode_pngs(_img_sources(html))


def test_mine_run_without_base_stage_renders_its_mining(tmp_path):
    root = make_run(tmp_path / "mine", seeds=(0,), optional=False, base_stage=False)
    html = write_report(root).read_text()
    assert set(MISSING.findall(html)) == {"detection", "sweep", "grids"}
    assert "base stage" in html and 'class="note error"' not in html
    for section in ("accuracy", "rounds", "synthetic"):
        assert f'<section id="{section}"><h2>' in html and section not in MISSING.findall(html)
    assert "base (long-tailed real data only)" not in html  # no base row: the run brought its classifier
    assert (
        "+ LTG (total, w=0.5)" in html and "+ LTG (entropy, w=2)" in html and "+ unguided synthetic" in html
    )
    assert len(_decode_pngs(_img_sources(html))) == 3  # accuracy bars, rounds, synthetic montage


def test_generate_output_renders(tmp_path):
    root = make_generate_output(tmp_path / "gen")
    run = load_run(root)
    assert run.kind == "generate" and len(run.manifest) == 12 and run.class_names == GENERATED_CLASSES
    html = write_report(root).read_text()
    assert _section_ids(html) == ["overview", "generated"]
    assert 'class="note missing"' not in html and 'class="note error"' not in html
    assert "12 images from tiny:shipped" in html and "Per guidance weight" in html
    assert len(_decode_pngs(_img_sources(html))) == 2  # signal / P(class) per weight, sample montage


def test_templates_escape_what_they_print(tmp_path):
    html = write_report(make_generate_output(tmp_path / "gen")).read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html


def test_calibrate_output_renders(tmp_path):
    root = make_calibrate_output(tmp_path / "cal")
    assert load_run(root).kind == "calibrate"
    html = write_report(root).read_text()
    assert _section_ids(html) == ["overview", "calibration", "sweep", "grids"]
    assert 'class="note missing"' not in html and 'class="note error"' not in html
    assert "w=0.5 raised entropy" in html and "1.000 → 1.100" in html  # the chosen point vs unguided
    assert "guided by <b>entropy</b>" in html and "the classifier being calibrated" in html
    assert len(_decode_pngs(_img_sources(html))) == 3  # sweep, 2 grids


def test_missing_or_empty_run_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path / "empty")


def test_unreadable_file_is_reported_not_fatal(tmp_path):
    root = make_run(tmp_path / "run", seeds=(0,), optional=False)
    (root / "metrics.json").write_text("{truncated")
    html = write_report(root).read_text()
    assert "Could not read metrics.json" in html and '<section id="accuracy">' in html


def test_sections_are_pluggable_and_isolated(full_run, tmp_path):
    def custom(run):
        return f"seeds here: {run.seeds}"

    def broken(run):
        raise KeyError("schema drift")

    templated = Section(
        "tpl", "Templated", lambda run: {"x": "<i>"}, jinja2.Template("<p>{{ d.x }}</p>", autoescape=True)
    )
    html = write_report(
        full_run,
        tmp_path / "r.html",
        sections=[Section("custom", "Custom", custom), Section("broken", "Broken", broken), templated],
    ).read_text()
    assert "seeds here: [0, 1]" in html
    assert 'class="note error"' in html and "schema drift" in html
    assert "<p>&lt;i&gt;</p>" in html


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
    assert '<section id="rounds">' in dom and '<section id="synthetic">' in dom  # the mining sections
    sources = _img_sources(dom)
    assert len(sources) == 10
    _decode_pngs(sources)


def test_a_switched_off_sweep_is_not_reported_missing(tmp_path):
    import yaml

    root = make_run(tmp_path / "mine", seeds=(0,), optional=False, base_stage=False)
    (root / "sweep" / "sweep.json").unlink(missing_ok=True)
    config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else {}
    (root / "config.yaml").write_text(yaml.safe_dump({**(config or {}), "sweep": {"signals": []}}))
    html = write_report(root).read_text()
    assert "off (set sweep.signals to run it)" in html


def test_grids_section_shows_guidance_options_with_judge_and_cost(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root)
    sweep = json.loads((root / "sweep" / "sweep.json").read_text())
    labels = torch.arange(len(CLASSES)).repeat_interleave(2)
    columns = {float(i): torch.zeros(len(labels), 1, 12, 12) for i in range(4)}
    save_grid(columns, labels, root / "sweep" / "grid_options.png", per_class=2)
    point = {"signal": "total", "weight": 0.5, "mean_signal": 1.4, "mean_p_class": 0.7, "accuracy": 0.8, "n": 16,
             "seconds": 4.0, "nonfinite": 0, "judge_accuracy": 0.875}
    sweep["options"] = {"signal": "total", "weight": 0.5, "columns": ["unguided", "w = 0.5", "views=4", "lowpass=1"],
                        "points": [{"option": "views=4", **point}, {"option": "lowpass=1", **point, "seconds": 1.0}]}
    (root / "sweep" / "sweep.json").write_text(json.dumps(sweep))
    html = build_html(load_run(root), [s for s in SECTIONS if s.id == "grids"])
    body = _section(html, "grids")
    assert "Guidance options at the chosen weight" in body
    assert len(_decode_pngs(_img_sources(body))) == len(SIGNALS) + 1  # the options grid is not a signal grid
    rows = _rows(body.split("Guidance options", 1)[1])
    # unguided: 16 images in 0.5 s; views=4 takes 4 s for 16, i.e. 8x the unguided time per image
    assert [r[0] for r in rows] == ["unguided", "LTG w = 0.5", "views=4", "lowpass=1"]
    assert rows[2][3] == "0.875" and rows[2][-1] == "8.0" and rows[3][-1] == "2.0" and rows[0][-1] == "1.0"


def _cells(body: str) -> list[tuple[str, ...]]:
    """The body rows of the first table in ``body``: the texts of their cells, tags (spans) removed."""
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1].split("</tbody>", 1)[0])
    return [tuple(re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)) for row in rows]


def _with_metrics(full_run: Path, root: Path, **changes: object) -> Path:
    """A copy of ``full_run`` with metrics.json's keys changed (``None``: removed)."""
    shutil.copytree(full_run, root)
    summary = json.loads((root / "metrics.json").read_text())
    summary.update(changes)
    summary = {k: v for k, v in summary.items() if v is not None}
    (root / "metrics.json").write_text(json.dumps(summary))
    return root


def _clean(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def test_nuisance_section_shows_split_accuracy_next_to_clean(full_run, tmp_path):
    html = write_report(full_run, tmp_path / "r.html").read_text()
    body = _section(html, "nuisance")
    assert "<h2>Nuisance test splits</h2>" in html and 'href="#nuisance"' in html
    assert "mean over 2 seed(s) ± std" in body and "every mode equally often" in body
    assert '<table class="compact">' in body
    assert re.findall(r"<th>([^<]*)</th>", body) == ["condition", "clean", "all", "rotate"]
    conditions = json.loads((full_run / "metrics.json").read_text())["conditions"]
    top1 = {c: _clean(m["top1"]) for c, m in conditions.items()}
    assert _cells(body) == [
        ("+ fine-tune, no synth", top1["none"], "0.412 ± 0.010", "0.200 ± 0.010"),
        ("+ unguided synthetic", top1["unguided"], "0.456 ± 0.020", "0.160 ± 0.020"),
        ("+ LTG (total, w=0.5)", top1["ltg"], "0.478 ± 0.030", "0.123 ± 0.006"),
        ("+ LTG (entropy, w=2)", top1["ltg:entropy@2"], "0.401 ± 0.004", "0.190 ± 0.020"),
    ]


def test_nuisance_section_puts_base_first_and_dashes_what_is_missing(full_run, tmp_path):
    splits = {
        "nuisance:blur": {"unguided": _ms(0.5, 0.1), "base": _ms(0.3, 0.02)},
        "other:blur": {"unguided": _ms(0.6, 0.0, 1)},  # same short name: full names as headers
    }
    root = _with_metrics(full_run, tmp_path / "run", splits=splits)
    body = _section(build_html(load_run(root), [s for s in SECTIONS if s.id == "nuisance"]), "nuisance")
    assert re.findall(r"<th>([^<]*)</th>", body) == ["condition", "clean", "nuisance:blur", "other:blur"]
    base = _clean(json.loads((root / "metrics.json").read_text())["base"]["top1"])
    rows = _cells(body)
    assert rows[0] == ("base (long-tailed real data only)", base, "0.300 ± 0.020", "–")
    assert rows[1][0] == "+ unguided synthetic"
    assert rows[1][2:] == ("0.500 ± 0.100", "0.600")  # one seed: no ±
    assert len(rows) == 2


def test_modes_section_shows_shares_detector_and_classes(full_run, tmp_path):
    html = write_report(full_run, tmp_path / "r.html").read_text()
    body = _section(html, "modes")
    assert "<h2>Nuisance modes in the synthetic data</h2>" in html
    assert "as the mode detector sees them" in body and "attribute captioner" not in body
    assert "(10000 images)" in body and "right 0.994 of the time" in body
    assert "a mode to 0.002 of the clean" in body
    table = body.split("<details>", 1)[0]
    assert re.findall(r"<th>([^<]*)</th>", table) == ["condition", "rotate", "invert"]
    assert _cells(table) == [
        ("+ unguided synthetic", "0.075", "0.044"),
        ("+ LTG (total, w=0.5)", "0.129", "0.042"),
        ("mode detector: recall on the test set", "0.989", "1.000"),
    ]
    blocks = re.findall(r"<details><summary>Per class: ([^<]*)</summary>(.*?)</details>", body, re.S)
    assert [label for label, _ in blocks] == ["+ unguided synthetic", "+ LTG (total, w=0.5)"]
    # classes in the run's order (alpha, beta), not metrics.json's
    assert _cells(blocks[1][1]) == [("alpha", "0.059", "0.084"), ("beta", "0.200", "0.000")]


def test_modes_section_by_the_captioner_reads_against_the_configured_rates(full_run, tmp_path):
    shares = {"ltg": {"all": {"rotate": 0.25, "cutoff": 0.125}, "gamma": {"rotate": 0.25}}, "bad": None}
    root = _with_metrics(full_run, tmp_path / "run", mode_shares=shares, mode_detector=None)
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["data"] = {"nuisance": {"rotate": 0.03, "invert": 0.03}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    body = _section(build_html(load_run(root), [s for s in SECTIONS if s.id == "modes"]), "modes")
    assert "as the attribute captioner sees them" in body and "mode detector sees" not in body
    assert _cells(body.split("<details>", 1)[0]) == [
        ("+ LTG (total, w=0.5)", "0.250", "0.125"),
        ("real training data: rate set in data.nuisance", "0.030", "–"),
    ]
    assert "recall" not in body and _cells(body.split("<details>", 1)[1]) == [("gamma", "0.250", "–")]


def test_overview_shows_compute_time_by_stage(full_run, tmp_path):
    body = _section(write_report(full_run, tmp_path / "r.html").read_text(), "overview")
    timing = body.split("<h3>Compute time</h3>", 1)[1]
    assert "3 min 20 s of wall-clock time" in timing
    assert _cells(timing) == [
        ("base", "60.0", "30%"),
        ("sweep", "30.0", "15%"),
        ("mining ltg", "90.0", "45%"),
        ("other (set-up, loading, summary)", "20.0", "10%"),
        ("total", "200.0", "100%"),
    ]


def test_runs_without_the_nuisance_keys_leave_them_out(full_run, tmp_path):
    root = make_run(tmp_path / "old", seeds=(0,), optional=False)
    html = write_report(root).read_text()
    assert '<section id="overview">' in html and '<section id="accuracy">' in html
    for gone in ('<section id="nuisance">', 'href="#nuisance"', '<section id="modes">', "Compute time"):
        assert gone not in html, gone
    assert 'class="note error"' not in html and 'class="note missing"' not in html
    # an older run with keys but no data, and its total time only (no stage_seconds)
    root = _with_metrics(full_run, tmp_path / "empty", splits={}, mode_shares={"ltg": {"all": "?"}},
                         mode_detector=None, stage_seconds=None, seconds=1244.26)
    html = write_report(root).read_text()
    assert '<section id="nuisance">' not in html and '<section id="modes">' not in html
    timing = _section(html, "overview").split("<h3>Compute time</h3>", 1)[1]
    assert "20 min 44 s of wall-clock time" in timing and "<table" not in timing.split("</div>", 1)[0]
    assert 'class="note error"' not in html


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42.04, "42.0 s"), (1244.26, "20 min 44 s"), (7500.0, "2 h 05 min"), (3599.7, "1 h 00 min")],
)
def test_durations_read_as_time(seconds, text):
    assert fmt_duration(seconds) == text


# --- the gallery (gallery.html next to the report) ---------------------------------------------------------

GALLERY_CLASSES = ["coat", "shirt"]
GALLERY_CONDITIONS = {"unguided": 0.0, "ltg": 1.0}  # condition -> guidance weight
MISCLASSIFIED = "ltg r2 coat#2"  # recorded as classified a shirt


def _gallery_id(cond: str, r: int, name: str, i: int) -> str:
    """The LTG store's ids hold a space and a '#', which its image URLs must quote."""
    return f"ltg r{r} {name}#{i}" if cond == "ltg" else f"u_r{r}_{name}_{i}"


def make_gallery_run(root: Path) -> Path:
    """A mine run (seed 0) with only mining rounds and synthetic data: 2 conditions x 2 classes x 2 rounds x
    3 small PNGs, each image with its own signal and P(class)."""
    rng = np.random.default_rng(3)
    config = {"out": str(root), "seeds": [0], "mining": {"conditions": list(GALLERY_CONDITIONS), "rounds": 2}}
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    signals = iter((rng.permutation(24) + 1) / 8)
    for cond, weight in GALLERY_CONDITIONS.items():
        folder = root / "seed_0" / "mining" / cond
        for r in (1, 2):
            (folder / f"round_{r}").mkdir(parents=True)
            (folder / f"round_{r}" / "metrics.json").write_text(json.dumps({"round": r, "top1": 0.5}))
        records = [
            {"id": (ident := _gallery_id(cond, r, name, i)), "class_id": c, "class_name": name, "round": r,
             "weight": weight, "signal_name": "total", "signal": next(signals), "p_class": rng.uniform(0.2, 0.9),
             "pred": 1 - c if ident == MISCLASSIFIED else c, "seed": 100 + i}
            for r in (1, 2)
            for c, name in enumerate(GALLERY_CLASSES)
            for i in range(3)
        ]
        SyntheticStore(folder / "synthetic").add(rng.integers(0, 255, (len(records), 8, 8), dtype=np.uint8), records)
    return root


def _gallery_manifest(root: Path) -> dict[str, dict[str, str]]:
    """Every manifest row of the run, by id, with its condition."""
    return {row["id"]: {**row, "condition": cond} for cond in GALLERY_CONDITIONS
            for row in SyntheticStore(root / "seed_0" / "mining" / cond / "synthetic").rows()}


def _gallery_rows(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="rows">(.*?)</script>', html, re.S)
    assert found, "no embedded rows"
    return json.loads(found[1])


def test_gallery_is_written_next_to_the_report_and_linked(tmp_path):
    root = make_gallery_run(tmp_path / "run")
    report = write_report(root).read_text()
    gallery = root / "gallery.html"
    assert gallery.is_file()
    assert '<a href="gallery.html">Browse all 24 images in the gallery</a>' in _section(report, "synthetic")
    html = gallery.read_text()
    assert '<a href="report.html">' in html and "data:image" not in html  # images by path, not inlined
    data = _gallery_rows(html)
    col = {k: i for i, k in enumerate(data["columns"])}
    assert data["stores"] == ["seed_0/mining/unguided/synthetic/", "seed_0/mining/ltg/synthetic/"]
    assert [c for c, _ in data["conditions"]] == ["unguided", "ltg"] and data["signals"] == ["total"]
    manifest = _gallery_manifest(root)
    assert sorted(row[col["id"]] for row in data["rows"]) == sorted(manifest)
    for row in data["rows"]:
        src = data["stores"][row[col["store"]]] + row[col["path"]]
        assert (root / unquote(src)).is_file(), src  # relative to the gallery, quoted
        if " " in row[col["id"]]:
            assert "%20" in src and "%23" in src and "#" not in src
        m = manifest[row[col["id"]]]
        assert data["classes"][str(row[col["class"]])] == m["class_name"]
        assert data["conditions"][row[col["condition"]]][0] == m["condition"]
        assert (row[col["seed"]], row[col["round"]], row[col["image_seed"]]) == (0, int(m["round"]), int(m["seed"]))
        assert (row[col["weight"]], row[col["signal"]], row[col["p_class"]]) == pytest.approx(
            (float(m["weight"]), float(m["signal"]), float(m["p_class"])))
    for key, values in (("class", ["coat", "shirt"]), ("condition", ["unguided", "ltg"]), ("round", ["1", "2"]),
                        ("weight", ["0", "1"])):
        select = re.search(rf'<select name="{key}">(.*?)</select>', html, re.S)[1]
        assert re.findall(r'<option value="([^"]+)">', select) == values, key
    assert '<label hidden>seed <select name="seed">' in html  # one seed: no filter to choose
    # past max_rows, one row in k is kept (a uniform sample) and the page says so
    thinned = gallery_data(load_run(root), root, max_rows=10)
    assert (thinned["total"], thinned["step"], len(thinned["data"]["rows"])) == (24, 3, 8)
    assert "24 synthetic images, 8 of them here (one in 3" in build_gallery(load_run(root), root, max_rows=10)
    # a report written elsewhere links its own gallery, whose paths lead back into the run
    elsewhere = write_report(root, tmp_path / "out" / "r.html")
    data = _gallery_rows((tmp_path / "out" / "gallery.html").read_text())
    assert data["stores"][0] == "../run/seed_0/mining/unguided/synthetic/"
    assert '<a href="gallery.html">' in elsewhere.read_text()


def test_gallery_of_a_generate_store_and_without_images(tmp_path):
    root = make_generate_output(tmp_path / "gen")
    report = write_report(root).read_text()
    assert '<a href="gallery.html">Browse all 12 images in the gallery</a>' in _section(report, "generated")
    html = (root / "gallery.html").read_text()
    assert "<b>x</b>" not in html  # the class name "<b>x</b>" is escaped in the options and in the JSON
    assert '<option value="&lt;b&gt;x&lt;/b&gt;">' in html and r"\u003cb\u003ex\u003c/b\u003e" in html
    data = _gallery_rows(html)
    col = {k: i for i, k in enumerate(data["columns"])}
    assert data["stores"] == ["./"] and data["conditions"] == [["generated", "generated"]]
    assert len(data["rows"]) == 12 and {row[col["seed"]] for row in data["rows"]} == {None}
    assert all((root / unquote(row[col["path"]])).is_file() for row in data["rows"])
    assert re.findall(r'<option value="([^"]+)">', re.search(r'<select name="weight">(.*?)</select>', html, re.S)[1]) \
        == ["0", "2"]
    # a run without synthetic images has no gallery, and no link to one
    bare = make_run(tmp_path / "bare", seeds=(0,), optional=False)
    shutil.rmtree(bare / "seed_0" / "mining")
    assert "gallery.html" not in write_report(bare).read_text() and not (bare / "gallery.html").exists()


def _figures(dom: str) -> list[dict[str, str]]:
    """The gallery's thumbnails in the rendered DOM: the figure's attributes, its <img>'s and caption lines."""
    out = []
    for attrs, body in re.findall(r"<figure ([^>]*)>(.*?)</figure>", dom, re.S):
        fig = dict(re.findall(r'([\w-]+)="([^"]*)"', attrs))
        fig["img"] = re.search(r"<img [^>]*>", body)[0]
        fig["lines"] = re.findall(r"<div[^>]*>([^<]*)</div>", body)
        out.append(fig)
    return out


def test_gallery_filters_sorts_and_loads_in_headless_chromium(tmp_path):
    root = make_gallery_run(tmp_path / "run")
    write_report(root)
    page = root / "gallery.html"
    # lazy=0: eager images delay the load event, after which --dump-dom serialises the page; lazy ones would not,
    # so whether they had loaded by the dump would be a race
    dom = chromium_dom(page, tmp_path / "profile", "class=coat&sort=signal&lazy=0")
    if dom is None:
        pytest.skip(f"{CHROMIUM} is not installed (CI installs it via apt)")
    manifest = _gallery_manifest(root)
    coats = sorted((r for r in manifest.values() if r["class_name"] == "coat"), key=lambda r: -float(r["signal"]))
    figures = _figures(dom)
    assert [html_unescape(f["data-id"]) for f in figures] == [r["id"] for r in coats]
    assert all(f["data-state"] == "loaded" for f in figures), [f.get("data-state") for f in figures]
    assert all(f["lines"][0] == "coat" and "loading=" not in f["img"] for f in figures)
    first = coats[0]
    label = "LTG (total, w=1)" if first["condition"] == "ltg" else "unguided"
    assert figures[0]["lines"][1:4] == [
        label, f"seed 0 · round {first['round']} · w {float(first['weight']):g}",
        f"total {float(first['signal']):.3f} · P {float(first['p_class']):.3f}"]
    flagged = [f["lines"][-1] for f in figures if html_unescape(f["data-id"]) == MISCLASSIFIED]
    assert flagged == ["classified shirt"]
    assert "12 of 24 images match; showing 12" in dom

    # another view: condition and round, P(class) from the lowest, a page of 4 lazy thumbnails and "show more"
    dom = chromium_dom(page, tmp_path / "profile", "condition=ltg&round=2&sort=p_class&order=asc&n=4")
    wanted = sorted((r for r in manifest.values() if r["condition"] == "ltg" and r["round"] == "2"),
                    key=lambda r: float(r["p_class"]))
    figures = _figures(dom)
    assert [html_unescape(f["data-id"]) for f in figures] == [r["id"] for r in wanted[:4]]
    assert all('loading="lazy"' in f["img"] for f in figures)
    assert "6 of 24 images match; showing 4" in dom
    assert re.search(r'<button id="more" type="button">show more</button>', dom)  # not hidden: 2 more to show


def test_run_json_reads_a_path_already_under_a_relative_root(tmp_path, monkeypatch):
    """A run opened by a relative path (``longtail report runs/demo``) reads files given as ``root / x`` too."""
    from longtail.report.load import load_run

    (tmp_path / "run" / "introspection").mkdir(parents=True)
    (tmp_path / "run" / "introspection" / "keywords.json").write_text('{"coat": ["tilted"]}')
    (tmp_path / "run" / "metrics.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    run = load_run("run")
    assert run.json(run.root / "introspection" / "keywords.json") == {"coat": ["tilted"]}
    assert run.json("introspection/keywords.json") == {"coat": ["tilted"]}
