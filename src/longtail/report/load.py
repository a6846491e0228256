"""Load a run directory (``run_kind``: ``mine``, ``generate`` or ``calibrate``) into one ``RunData``; every
part is optional. Mining folders (``seed_<s>/mining/<Condition.dirname>/``) map back to condition texts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from ..conditions import Condition, ConditionError, condition_label
from ..data.store import SyntheticStore
from ..data.store_formats import open_store
from ..files import read_json

KINDS = ("mine", "generate", "calibrate")
CONDITION_ORDER = ("none", "unguided", "ltg")
MINE_FILES = ("config.yaml", "metrics.json", "summary.txt", "sweep")
SEED_DIR = re.compile(r"seed_(\d+)")
ROUND_DIR = re.compile(r"round_(\d+)")


def condition_dirname(text: str) -> str:
    """The folder a condition's results live in (``ltg:total@3`` -> ``ltg_total_w3``); old texts unchanged."""
    try:
        return Condition.parse(text).dirname
    except ConditionError:
        return text


@dataclass
class RunData:
    """What a run directory holds, loaded once; missing pieces are ``None`` / empty."""

    root: Path
    kind: str = "mine"
    config_text: str | None = None
    config: dict | None = None
    summary_text: str | None = None
    metrics: dict | None = None
    sweep: dict | None = None  # sweep/sweep.json, metrics.json's sweep, or calibration.json
    efficiency: dict | None = None  # efficiency.json or metrics.json's efficiency (the data-efficiency curve)
    base: dict[int, dict] = field(default_factory=dict)  # seed -> base metrics
    mining: dict[int, dict[str, list[dict]]] = field(default_factory=dict)  # seed -> condition text -> rounds
    class_names: list[str] = field(default_factory=list)
    manifest: list[dict[str, str]] = field(default_factory=list)  # generate: rows of <root>/manifest.csv
    problems: list[str] = field(default_factory=list)  # files that exist but could not be read
    gallery: str | None = None  # the gallery page (gallery.py), relative to the report; set by write_report

    @property
    def seeds(self) -> list[int]:
        return sorted(set(self.base) | set(self.mining))

    @property
    def conditions(self) -> list[str]:
        """Condition texts with mining results, in the configured order (then none, unguided, ltg, others)."""
        found = {c for per_seed in self.mining.values() for c in per_seed}
        order = [*configured_conditions(self.config, self.metrics), *CONDITION_ORDER]
        return sorted(found, key=lambda c: (order.index(c) if c in order else len(order), c))

    @property
    def grid_dir(self) -> Path:
        """Where the sweep's ``grid_<signal>.png`` are: ``sweep/`` of a run, a calibrate output itself."""
        return self.root if self.kind == "calibrate" else self.root / "sweep"

    def condition_label(self, cond: str) -> str:
        """The condition's label, with the signal and weight the run resolved for it (``metrics.json``)."""
        guided = ((self.metrics or {}).get("condition_guidance") or {}).get(cond)
        if cond != "ltg" or guided is not None:
            return condition_label(cond, guided)
        ltg, mining = (self.metrics or {}).get("ltg") or {}, (self.config or {}).get("mining") or {}
        signal, weight = ltg.get("signal", mining.get("signal")), ltg.get("weight", mining.get("weight"))
        if signal is None:
            return "+ LTG synthetic"
        shown = f"{signal}, w={weight:g}" if isinstance(weight, int | float) else signal
        return f"+ LTG ({shown}) synthetic"

    def histories(self, cond: str) -> list[list[dict]]:
        """The condition's mining rounds, one list per seed that ran it."""
        return [self.mining[s][cond] for s in self.seeds if cond in self.mining.get(s, {})]

    def store_dir(self, seed: int, cond: str) -> Path:
        """A condition's synthetic store: ``seed_<s>/mining/<condition dir>/synthetic``."""
        return self.root / f"seed_{seed}" / "mining" / condition_dirname(cond) / "synthetic"

    def scores(self, seed: int) -> dict[str, Tensor] | None:
        """``seed_<s>/base/test_scores.safetensors``: ``signal/<name>``, ``labels``, ``preds``, ``rare``."""
        path = self.root / f"seed_{seed}" / "base" / "test_scores.safetensors"
        if not path.is_file():
            return None
        from ..files import read_state_dict

        return read_state_dict(path, "base-stage scores")

    def class_name(self, c: int) -> str:
        return self.class_names[c] if c < len(self.class_names) else f"class {c}"

    def json(self, path: str | Path) -> Any:
        """A JSON file under the run (``path`` relative to the run, or already joined to ``root``), ``None`` when
        absent or unreadable (noted in ``problems``)."""
        path = Path(path)
        if not path.is_absolute() and path.parts[: len(self.root.parts)] != self.root.parts:
            path = self.root / path  # a relative root is not joined twice (runs/demo/runs/demo/...)
        try:
            return read_json(path)
        except (OSError, ValueError) as err:
            self.problems.append(f"{path.name}: {type(err).__name__}: {err}")
            return None


def configured_conditions(config: dict | None, metrics: dict | None) -> list[str]:
    """Condition texts the run lists: config ``mining.conditions`` / ``conditions``, then metrics.json."""
    config, metrics = config or {}, metrics or {}
    mining = config.get("mining") if isinstance(config.get("mining"), dict) else {}
    texts = [*(mining.get("conditions") or []), *(config.get("conditions") or [])]
    texts += [*(metrics.get("conditions") or {}), *(metrics.get("condition_guidance") or {})]
    for per_seed in (metrics.get("per_seed") or {}).values():
        texts += list((per_seed or {}).get("mining") or {})
    return list(dict.fromkeys(str(t) for t in texts))


def seed_dirs(root: Path) -> set[int]:
    """Seeds with a ``seed_<s>/`` folder."""
    return {int(m[1]) for d in root.glob("seed_*") if d.is_dir() and (m := SEED_DIR.fullmatch(d.name))}


def _sharded(root: Path) -> str | None:
    """The format of a Parquet / WebDataset store at ``root`` (``generate --format``), else None."""
    from ..data.store_formats import store_format

    try:
        fmt = store_format(root)
    except ValueError:
        return None
    return fmt if fmt in ("parquet", "webdataset") else None


def run_kind(root: Path, config: dict | None = None) -> str:
    """``mine``, ``generate`` or ``calibrate`` from the files present (then the config's keys)."""
    if (root / "calibration.json").is_file():
        return "calibrate"
    if (root / "manifest.csv").is_file() or any(root.glob("manifest.part-*.csv")) or _sharded(root):
        return "generate"
    config = config or {}
    if "min_p_ratio" in config:
        return "calibrate"
    if "per_class" in config and not {"mining", "conditions", "schedule"} & set(config):
        return "generate"
    if any((root / k).exists() for k in MINE_FILES) or seed_dirs(root):
        return "mine"
    raise FileNotFoundError(
        f"{root} is not a run directory: none of {', '.join(MINE_FILES)}, seed_*/, manifest.csv or "
        "calibration.json is there"
    )


def _round_histories(run: RunData, seed: int) -> dict[str, list[dict]]:
    """``seed_<s>/mining/<condition dir>/round_<r>/metrics.json`` -> condition text -> rounds in order."""
    texts = {condition_dirname(t): t for t in configured_conditions(run.config, run.metrics)}
    out: dict[str, list[dict]] = {}
    for cond_dir in sorted((run.root / f"seed_{seed}" / "mining").glob("*")):
        rounds = []
        for d in cond_dir.glob("round_*"):
            row = run.json(d / "metrics.json") if (m := ROUND_DIR.fullmatch(d.name)) else None
            if isinstance(row, dict):
                rounds.append({**row, "round": int(m[1])})
        if rounds:
            out[texts.get(cond_dir.name, cond_dir.name)] = sorted(rounds, key=lambda r: r["round"])
    return out


def _load_seeds(run: RunData) -> None:
    """Base metrics and mining histories per seed, from the seed folders, else metrics.json's ``per_seed``."""
    per_seed = {int(s): v or {} for s, v in ((run.metrics or {}).get("per_seed") or {}).items()}
    for seed in sorted(seed_dirs(run.root) | set(per_seed)):
        base = run.json(f"seed_{seed}/base/metrics.json") or per_seed.get(seed, {}).get("base")
        if base is not None:
            run.base[seed] = base
        mining = {**(per_seed.get(seed, {}).get("mining") or {}), **_round_histories(run, seed)}
        if mining:
            run.mining[seed] = mining


def _class_names(run: RunData) -> list[str]:
    """From metrics.json, calibration.json or class_names.json, else the manifests, else ``class <i>``."""
    for source in (run.metrics, run.sweep if run.kind == "calibrate" else None):
        if source and source.get("class_names"):
            return [str(n) for n in source["class_names"]]
    listed = run.json("class_names.json")
    if isinstance(listed, list) and listed:
        return [str(n) for n in listed]
    rows = list(run.manifest)
    for manifest in sorted(run.root.glob("seed_*/mining/*/synthetic/manifest.csv")):
        rows += SyntheticStore(manifest.parent).rows()
    names: dict[int, str] = {}
    for row in rows:
        names.setdefault(int(row["class_id"]), row["class_name"])
    num = max([len(b.get("per_class", [])) for b in run.base.values()] + [max(names, default=-1) + 1])
    return [names.get(c, f"class {c}") for c in range(num)]


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; raises ``FileNotFoundError`` naming the path if it is absent or not a run."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist (or is not a directory)")
    config, summary = root / "config.yaml", root / "summary.txt"
    run = RunData(root, config_text=config.read_text() if config.is_file() else None)
    run.summary_text = summary.read_text() if summary.is_file() else None
    if run.config_text is not None:
        try:
            loaded = yaml.safe_load(run.config_text)
        except yaml.YAMLError as err:
            run.problems.append(f"config.yaml: {err}")
            loaded = None
        run.config = loaded if isinstance(loaded, dict) else None
    run.kind = run_kind(root, run.config)
    metrics = run.json("metrics.json")
    run.metrics = metrics if isinstance(metrics, dict) else None
    if run.kind == "calibrate":
        run.sweep = run.json("calibration.json")
    else:
        run.sweep = run.json("sweep/sweep.json") or (run.metrics or {}).get("sweep")
        efficiency = run.json("efficiency.json") or (run.metrics or {}).get("efficiency")
        run.efficiency = efficiency if isinstance(efficiency, dict) else None
    _load_seeds(run)
    if run.kind == "generate":  # a PNG ImageFolder, or a Parquet / WebDataset store (--format)
        run.manifest = open_store(root, fmt).rows() if (fmt := _sharded(root)) else SyntheticStore(root).rows()
    run.class_names = _class_names(run)
    return run
