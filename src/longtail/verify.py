"""``longtail verify``: what a re-run would redo in a store or a run directory, changing nothing.

Every synthetic store under the directory (a folder with ``manifest.csv`` or manifest parts) is read as the
store reads it (``longtail.data.store.read_manifest``): rows it drops and why, files with a damaged header.
Every folder with mining rounds (``round_<r>/``) is checked as a resumed ``mine`` checks it
(``longtail.mining.check_rounds``): unreadable or half-written rounds and the rounds redone after them.
A sharded store (Parquet or WebDataset, ``store.json``) is checked file by file: an unreadable data file is a
problem. A store's index (``manifest.index``, ``shards.index``) that no longer matches is reported, not counted
as a problem: start-up then reads the manifest in full and the next merge rewrites it. Shards of a
``generate --shard`` run waiting under ``parts/`` are named with the merge command.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data.store import DAMAGED, INDEX, MANIFEST, PART_GLOB, read_index, read_manifest
from .data.store_formats import MARKER, data_files, read_ids, read_shard_index, store_format
from .mining import check_rounds

ROUND = re.compile(r"round_\d+")


@dataclass
class Verdict:
    """The lines to print and how many of them are problems (0: everything intact)."""

    lines: list[str] = field(default_factory=list)
    problems: int = 0

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def problem(self, line: str) -> None:
        self.lines.append(line)
        self.problems += 1


def check_store(root: Path, verdict: Verdict) -> None:
    """One store: a line per dropped row and damaged file, then its count of good images."""
    files = ([root / MANIFEST] if (root / MANIFEST).is_file() else []) + sorted(root.glob(PART_GLOB))
    ids: set[str] = set()
    for path in files:
        check = read_manifest(path, root)
        if check.empty:
            verdict.problem(f"{path}: {check.damaged}; a re-run replaces it")
        elif check.damaged:
            verdict.problem(f"{path}: {check.damaged}; a re-run sets it aside as {path.name}{DAMAGED} and makes "
                            "its images again")
        for message in check.dropped:
            verdict.problem(message)
        ids.update(row["id"] for _, row in check.rows)
    for old in sorted(root.glob(f"manifest*{DAMAGED}")):
        verdict.lines.append(f"{old}: set aside earlier (damaged header), not read")
    if (root / INDEX).is_file() and read_index(root) is None:
        verdict.lines.append(f"{root / INDEX}: does not match manifest.csv (start-up reads the manifest in full; "
                             "the next merge rewrites it)")
    verdict.lines.append(f"{root}: {len(ids)} image{'' if len(ids) == 1 else 's'} listed and present")


def check_sharded_store(root: Path, fmt: str, verdict: Verdict) -> None:
    """A Parquet / WebDataset store: every data file's ids readable; then its count of images."""
    ids: set[str] = set()
    files = data_files(root, fmt)
    for path in files:
        try:
            ids.update(read_ids(path))
        except Exception as err:  # any reader error: the file is unusable
            verdict.problem(f"{path}: unreadable ({err}); a re-run makes its images again")
    listed = read_shard_index(root)
    if {p.name for p in files} != set(listed):
        verdict.lines.append(f"{root}: shards.index lists {len(listed)} of {len(files)} data files (the next merge "
                             "rewrites it)")
    verdict.lines.append(f"{root}: {len(ids)} image{'' if len(ids) == 1 else 's'} in {len(files)} {fmt} file(s)")


def verify(out: str | Path) -> Verdict:
    """Check every store and every folder of mining rounds under ``out`` (``out`` itself included).

    Raises ``FileNotFoundError`` when ``out`` is not a directory and ``DataError`` when nothing under it is a
    store or a run (both exit code 2 on the command line)."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory")
    verdict = Verdict()
    stores, runs, sharded = [], [], []
    for folder, dirs, files in os.walk(out):
        dirs.sort()
        names = set(files)
        if "parts" in dirs and any(Path(folder, "parts").glob("shard-*-of-*")):
            sharded.append(Path(folder))
        if MANIFEST in names or MARKER in names or any(
                Path(f).match(PART_GLOB) or (f.endswith(DAMAGED) and f.startswith("manifest")) for f in names):
            stores.append(Path(folder))
        if any(ROUND.fullmatch(d) for d in dirs):
            runs.append(Path(folder))
    for root in stores:
        fmt = store_format(root)
        if fmt in (None, "png"):
            check_store(root, verdict)
        else:
            check_sharded_store(root, fmt, verdict)
    for run in sharded:
        verdict.lines.append(f"{run}: shards waiting under parts/; when all are done: longtail merge {run}")
    for run in runs:
        problems = check_rounds(run)
        for line in problems:
            verdict.problem(line)
        if not problems:
            done = sorted(int(d.name[6:]) for d in run.glob("round_*") if ROUND.fullmatch(d.name) and
                          (d / "metrics.json").is_file())
            verdict.lines.append(f"{run}: rounds {', '.join(map(str, done)) or 'none'} intact")
    if not stores and not runs:  # bad input (exit 2), not "something needs redoing" (exit 1)
        from .data.datasets import DataError

        raise DataError(f"{out} is neither a synthetic store nor a run: no manifest.csv, store.json or mining "
                        "rounds (round_<r>/) under it")
    if verdict.ok:
        verdict.lines.append("intact: a re-run redoes nothing")
    else:
        verdict.lines.append(f"{verdict.problems} problem(s): a re-run redoes what is listed above")
    return verdict
