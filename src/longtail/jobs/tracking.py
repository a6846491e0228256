"""Experiment tracking of ``longtail mine`` through accelerate's trackers (``Accelerator(log_with=...)``).

The mine config's ``track`` (``none`` | ``tensorboard`` | ``wandb`` | ``mlflow``) picks the tracker; logs go under
``<out>/tracking/`` (TensorBoard event files in ``tracking/longtail/``, the wandb run's files in ``tracking/wandb/``,
and unless ``MLFLOW_TRACKING_URI`` names a server, an MLflow store ``tracking/mlflow.db`` (SQLite) with artifacts in
``tracking/mlartifacts/``). Credentials and servers come from the environment only (``WANDB_API_KEY``,
``WANDB_MODE``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` ...), never from the config.

What is logged (only by the main process), each tag made of ``[A-Za-z0-9_.-/]``:

- the resolved config, as the run's hyperparameters (flattened ``section.key``);
- per seed, condition and round: ``mining/<condition>/seed_<s>/{top1,many,medium,few}``, step = round
  (round 0 = the base classifier);
- the sweep: per signal and point (step = the point's index, unguided first, by weight)
  ``sweep/<signal>/{weight,signal,p_class,accuracy}`` (+ ``judge_accuracy``, ``judge_p_class``,
  ``judge_precision`` with a judge), ``sweep/<signal>/chosen_weight``; its grids ``sweep/grid_<name>`` as images
  (TensorBoard, wandb) or artifacts (MLflow);
- the summary: ``summary/<condition>/<metric>`` (mean over seeds; ``_std`` beside it with several seeds) and
  ``summary/base/<metric>``, step = the last round.

A resumed run logs what it reloads again (same steps). ``run_mine`` calls :func:`start`, then ``sweep``,
``rounds`` and ``finish`` of the returned :class:`RunTracker`; with ``track: none`` they do nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError

# tracker -> the package it needs (what to pip install); None: nothing
TRACKERS: dict[str, str | None] = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "longtail"  # TensorBoard subfolder, wandb project (WANDB_PROJECT wins), MLflow experiment
ROUND_METRICS = ("top1", "many", "medium", "few")
SUMMARY_METRICS = ("top1", "many", "medium", "few", "hard")
SWEEP_FIELDS = {"weight": "weight", "signal": "mean_signal", "p_class": "mean_p_class", "accuracy": "accuracy",
                "judge_accuracy": "judge_accuracy", "judge_p_class": "judge_p_class",
                "judge_precision": "judge_precision"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")


def check_track(track: str) -> None:
    """``track`` must name a known tracker whose package is installed; a ConfigError naming what to do."""
    if track not in TRACKERS:
        raise ConfigError(f"track must be one of {', '.join(TRACKERS)}, got {track!r}")
    package = TRACKERS[track]
    # TensorBoard: accelerate also writes through tensorboardX when torch.utils.tensorboard cannot import
    found = package is None or importlib.util.find_spec(package) is not None or (
        track == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None)
    if not found:
        raise ConfigError(f"track: {track} needs the {package} package, which is not installed: "
                          f"pip install {package} (or set track: none)")


def tracking_dir(out: str | Path) -> Path:
    return Path(out) / "tracking"


def accelerator_kwargs(track: str, out: str | Path) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs for ``track``: ``log_with`` and a logging directory under ``<out>``."""
    if track == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": track, "project_config": ProjectConfiguration(project_dir=str(out),
                                                                      logging_dir=str(tracking_dir(out)))}


def tag(*parts: object) -> str:
    """A metric name every tracker accepts (MLflow is the strictest): unsafe characters become ``_``."""
    return "/".join(_UNSAFE.sub("_", str(p)) for p in parts)


def flat_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``section.key`` -> bool / int / float / str (lists, mappings and None as JSON)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class RunTracker:
    """The tracker of one ``run_mine`` invocation (``track: none``: every method does nothing)."""

    def __init__(self, track: str, acc: Any = None, run: Path | None = None) -> None:
        self.track, self.acc, self.run = track, acc, run
        self.on = track != "none" and acc is not None and acc.is_main_process

    def _log(self, values: Mapping[str, Any], step: int, axis: str) -> None:
        """Scalars at ``step``; wandb wants one increasing step per run, so it gets ``step`` as the value of
        ``axis`` (its x-axis for those tags, ``define_metric``) instead."""
        scalars = {k: v for k, raw in values.items() if (v := _number(raw)) is not None}
        if not self.on or not scalars:
            return
        if self.track == "wandb":
            self.acc.log({**scalars, axis: step})
        else:
            self.acc.log(scalars, step=step)

    def rounds(self, seed: int, condition: str, history: list[dict]) -> None:
        """Accuracy per round of one seed and condition (``stage_mining``'s history; round 0 = base)."""
        for row in history:
            self._log({tag("mining", condition, f"seed_{seed}", k): row.get(k) for k in ROUND_METRICS},
                      int(row.get("round", 0)), "round")

    def sweep(self, sweep: Mapping[str, Any] | None, sweep_dir: Path) -> None:
        """The sweep's points per signal (step = index by weight), chosen weights, and grid images."""
        if not self.on or not sweep:
            return
        points = sweep.get("points", [])
        for signal in dict.fromkeys(p["signal"] for p in points):
            mine = sorted((p for p in points if p["signal"] == signal), key=lambda p: p["weight"])
            for i, point in enumerate(mine):
                self._log({tag("sweep", signal, name): point.get(key) for name, key in SWEEP_FIELDS.items()}, i,
                          "sweep/point")
            choice = (sweep.get("choices") or {}).get(signal) or {}
            self._log({tag("sweep", signal, "chosen_weight"): choice.get("weight")}, 0, "sweep/point")
        for png in sorted(Path(sweep_dir).glob("grid_*.png")):
            self.image(tag("sweep", png.stem), png)

    def image(self, name: str, path: Path) -> None:
        """A PNG: an image in TensorBoard and wandb, an artifact in MLflow."""
        if not self.on:
            return
        if self.track == "mlflow":
            self.acc.get_tracker("mlflow").log_artifact(str(path), artifact_path="sweep")
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        if self.track == "tensorboard":
            writer = self.acc.get_tracker("tensorboard", unwrap=True)
            writer.add_image(name, pixels, global_step=0, dataformats="HWC")
            writer.flush()
        else:
            self.acc.get_tracker(self.track).log_images({name: [pixels]})

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The summary's per-condition numbers (mean, and std), then close the trackers."""
        if not self.on:
            return
        rounds = [row.get("round", 0) for seed in (summary.get("per_seed") or {}).values()
                  for history in (seed.get("mining") or {}).values() for row in history]
        step = int(max(rounds, default=0))
        values: dict[str, Any] = {}
        rows = {"base": summary.get("base") or {}, **(summary.get("conditions") or {})}
        for condition, metrics in rows.items():
            for metric in SUMMARY_METRICS:
                cell = metrics.get(metric) or {}
                values[tag("summary", condition, metric)] = cell.get("mean")
                if (cell.get("n") or 0) > 1:  # one seed: no spread to show
                    values[tag("summary", condition, f"{metric}_std")] = cell.get("std")
        self._log(values, step, "round")
        for tracker in self.acc.trackers:  # not end_training(): that also ends the process group
            tracker.finish()
        self.acc.trackers = []
        self.on = False


def start(cfg: Any, acc: Any) -> RunTracker:
    """Start ``cfg.track``'s tracker on ``acc`` (built with :func:`accelerator_kwargs`), the resolved config as
    hyperparameters; returns the run's :class:`RunTracker`."""
    from ..config import to_dict

    if cfg.track == "none":
        return RunTracker("none")
    run = Path(cfg.out)
    logs = tracking_dir(run)
    init: dict[str, dict] = {}
    if acc.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
    if cfg.track == "wandb":
        import os

        init["wandb"] = {"name": run.resolve().name, "dir": str(logs)}
        project = os.environ.get("WANDB_PROJECT", PROJECT)
    else:
        project = PROJECT
    if cfg.track == "mlflow":
        import os

        init["mlflow"] = {"run_name": run.resolve().name}
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local store (MLflow 3 refuses a file store by default)
            import mlflow

            init["mlflow"]["logging_dir"] = (logs / "mlartifacts").resolve().as_uri()  # a new experiment's artifacts
            if acc.is_main_process:
                mlflow.set_tracking_uri(f"sqlite:///{(logs / 'mlflow.db').resolve()}")
    acc.init_trackers(project, config=flat_config(to_dict(cfg)), init_kwargs=init)
    tracker = RunTracker(cfg.track, acc, run)
    if tracker.on and cfg.track == "wandb":
        wandb_run = acc.get_tracker("wandb", unwrap=True)
        for axis, pattern in (("round", "mining/*"), ("round", "summary/*"), ("sweep/point", "sweep/*")):
            wandb_run.define_metric(axis)
            wandb_run.define_metric(pattern, step_metric=axis)
    return tracker
