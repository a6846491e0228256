"""``longtail merge OUT``: check the shards of a ``longtail generate --shard i/n`` run and fold them into OUT.

Checks, before anything is changed: every part was made with the same result-defining settings (the
``settings_sha256`` of its ``settings.json``; a difference is refused naming the keys, as
``jobs.common.check_same_settings`` names them), the same number of shards and store format, and the settings
of a store already in OUT; every id of the plan (``shard.json``: the per-class counts of the whole job list)
is present exactly once, in the shard it belongs to; every image decodes. An image that does not decode is set
aside (``<file>.damaged``) so that a re-run of its shard makes it again.

When something is missing, nothing is folded: the missing ids and the command that re-runs each incomplete
shard are printed (exit 1). Otherwise the parts are folded: images (or data files) are hard-linked into OUT,
then OUT's manifest (``manifest.csv`` + ``manifest.index`` + ``metadata.csv``, or ``shards.index``) is written
in one atomic rename, and only then are the parts removed. A kill at any point leaves OUT readable (only
complete images listed) and the parts intact; running ``longtail merge`` again finishes the job. The result is
the store an unsharded run with the same config makes: the same ids and the same image bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..config import ConfigError, dump_config, load_config
from ..data.store import INDEX, SyntheticStore, adopt_rows, link_file
from ..data.store_formats import MARKER, ShardedStore, check_format, read_file, store_format
from ..files import write_json
from .common import check_same_settings
from .generate import GENERATION_KEYS, GenerateConfig, planned_ids
from .shards import PARTS, SHARD_DIR, SHARD_JSON

SHOWN = 5  # missing ids printed per shard


@dataclass
class Part:
    """One shard's folder and what it says about itself (``shard.json``; None when it never finished starting)."""

    path: Path
    index: int
    count: int
    plan: dict | None

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"


@dataclass
class MergeResult:
    """What ``merge_parts`` found and did: printed ``lines``, missing ids per shard, ``merged`` image count."""

    out: Path
    lines: list[str] = field(default_factory=list)
    missing: dict[int, list[str]] = field(default_factory=dict)
    problems: int = 0
    merged: int = 0

    @property
    def ok(self) -> bool:
        return self.problems == 0 and not self.missing


def find_parts(out: Path) -> list[Part]:
    """The shard folders under ``<out>/parts/``, by shard index; ConfigError when there are none."""
    parts = []
    for path in sorted((out / PARTS).glob("shard-*-of-*")):
        match = SHARD_DIR.fullmatch(path.name)
        if match and path.is_dir():
            plan = json.loads((path / SHARD_JSON).read_text()) if (path / SHARD_JSON).is_file() else None
            parts.append(Part(path, int(match.group(1)), int(match.group(2)), plan))
    if not parts:
        raise ConfigError(f"{out}: no shards to merge (no {PARTS}/shard-<i>-of-<n>/ folders, which "
                          "`longtail generate --shard i/n --out OUT` writes)")
    return parts


def differing_keys(reference: Path, other: Path) -> list[str]:
    """The result-defining keys (``GENERATION_KEYS``) in which the config of the part at ``other`` differs from
    the one at ``reference``; compared as ``check_same_settings`` compares them (free settings ignored)."""
    cfg = load_config(GenerateConfig, other / "config.yaml")
    keys = []
    for key in GENERATION_KEYS:
        try:
            check_same_settings(reference, cfg, (key,), "generate")
        except ConfigError:
            keys.append(key)
    return keys


def check_one_config(out: Path, parts: list[Part]) -> tuple[Part, GenerateConfig]:
    """Refuse (ConfigError naming the keys) parts of different settings, shard counts or formats, or parts
    unlike a store already in ``out``. Returns the reference part (the first with a plan) and its config."""
    started = [p for p in parts if p.plan is not None]
    if not started:
        raise ConfigError(f"{out}: no shard got past its start (no {SHARD_JSON} in any part); re-run them")
    ref = started[0]
    for part in started[1:]:
        if part.plan["settings_sha256"] != ref.plan["settings_sha256"]:
            keys = differing_keys(ref.path, part.path) or ["settings_sha256"]
            raise ConfigError(f"refusing to merge {out}: {part.path.name} was made with other settings than "
                              f"{ref.path.name} ({', '.join(keys)} differ); re-run it with the same config")
        differ = [f"{what} ({key}: {part.plan.get(key)!r} vs {ref.plan.get(key)!r})"
                  for key, what in (("num_shards", "shard count"), ("format", "format"), ("counts", "plan"))
                  if part.plan.get(key) != ref.plan.get(key)]
        if differ:
            raise ConfigError(f"refusing to merge {out}: {part.path.name} and {ref.path.name} differ in "
                              f"{'; '.join(differ)}")
    strays = [p.path.name for p in parts if p.count != ref.plan["num_shards"]]
    if strays:
        raise ConfigError(f"refusing to merge {out}: {', '.join(strays)} belong to a run of another shard count "
                          f"than {ref.plan['num_shards']}")
    cfg = load_config(GenerateConfig, ref.config)
    if (out / "config.yaml").is_file():
        check_same_settings(out, cfg, GENERATION_KEYS, "generate")
    try:
        check_format(out, ref.plan["format"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ref, cfg


def _decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except Exception:
        return False


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + ".damaged")
    os.replace(path, target)
    return target


def checked_ids(part: Part, fmt: str, result: MergeResult) -> dict[str, str | Path]:
    """The ids of ``part`` whose image decodes, each with where it is (a PNG path relative to the part, or a
    data file); undecodable images or data files are set aside and reported (a re-run makes them again)."""
    found: dict[str, str | Path] = {}
    if fmt == "png":
        for row in SyntheticStore(part.path).rows():
            path = part.path / row["path"]
            if _decodes(path.read_bytes()):
                found[row["id"]] = row["path"]
            else:
                result.lines.append(f"{path}: does not decode; set aside as {_set_aside(path).name}")
                (part.path / INDEX).unlink(missing_ok=True)  # the index vouches for it: a re-run must read all
        return found
    for path in ShardedStore(part.path, fmt).data_files():
        try:
            entries = read_file(path, with_images=True)
            good = all(data is not None and _decodes(data) for _, data in entries)
        except Exception:
            good = False
        if not good:
            result.lines.append(f"{path}: an image in it does not decode; set aside as {_set_aside(path).name}")
            continue
        for row, _ in entries:
            found.setdefault(row["id"], path)
    return found


def _rerun(part_config: Path, index: int, count: int) -> str:
    return f"longtail generate --config {part_config} --shard {index}/{count}"


def merge_parts(out: str | Path, log: Callable[[str], None] = print) -> MergeResult:
    """Check the shards under ``<out>/parts/`` and, when complete, fold them into ``out`` (module docstring).

    Raises ConfigError (refused, nothing changed) for parts of different settings, shard counts or formats.
    Returns a :class:`MergeResult`; ``ok`` is False when ids are missing, misplaced or duplicated (nothing is
    folded then, and the lines say which shards to re-run and how)."""
    out = Path(out)
    parts = find_parts(out)
    ref, cfg = check_one_config(out, parts)
    fmt, count = ref.plan["format"], ref.plan["num_shards"]
    result = MergeResult(out)
    every = planned_ids(ref.plan["counts"])
    have = set(_store_ids(out, fmt))
    by_index = {p.index: p for p in parts}
    owner: dict[str, int] = {}
    found: dict[int, dict[str, str | Path]] = {}
    for k in range(count):
        part = by_index.get(k)
        ids = checked_ids(part, fmt, result) if part is not None and part.plan is not None else {}
        share = set(every[k::count])
        strays = sorted(set(ids) - share)
        if strays:
            result.problems += 1
            result.lines.append(f"{part.path}: {len(strays)} id(s) outside shard {k}/{count}'s share, e.g. "
                                f"{strays[0]}; remove that folder and re-run the shard")
        twice = sorted(i for i in ids if i in owner)
        if twice:
            result.problems += 1
            result.lines.append(f"{part.path}: {len(twice)} id(s) also in shard {owner[twice[0]]}, e.g. {twice[0]}")
        owner.update(dict.fromkeys(ids, k))
        found[k] = ids
        missing = [i for i in every[k::count] if i not in ids and i not in have]
        if missing:
            result.missing[k] = missing
            config = part.config if part is not None and part.config.is_file() else ref.config
            shown = ", ".join(missing[:SHOWN]) + (" ..." if len(missing) > SHOWN else "")
            result.lines.append(f"shard {k}/{count}: {len(missing)} of {len(share)} images missing ({shown}); "
                                f"re-run: {_rerun(config, k, count)}")
    if not result.ok:
        result.lines.append(f"{out}: not merged ({len(result.missing)} shard(s) incomplete, {result.problems} "
                            "problem(s)); run `longtail merge` again after the re-runs")
        for line in result.lines:
            log(line)
        return result
    dump_config(replace(cfg, out=str(out), shard=None), out / "config.yaml")
    write_json(out / "settings.json", {"settings_sha256": ref.plan["settings_sha256"], "keys": list(GENERATION_KEYS)})
    result.merged = _fold(out, fmt, parts, found)
    shutil.rmtree(out / PARTS)
    result.lines.append(f"{out}: {count} shard(s) merged, {result.merged} images ({fmt}); parts removed")
    for line in result.lines:
        log(line)
    return result


def _store_ids(out: Path, fmt: str) -> list[str]:
    """Ids already folded into ``out`` (a merge that was killed after its manifest was written)."""
    if store_format(out) is None:
        return []
    if fmt == "png":
        return [row["id"] for row in SyntheticStore(out).rows()]
    return [row["id"] for row in ShardedStore(out, fmt).rows()]


def _fold(out: Path, fmt: str, parts: list[Part], found: dict[int, dict[str, str | Path]]) -> int:
    """Link every part's images (or data files) into ``out``, then write its manifest atomically; returns the
    image count of the folded store."""
    if fmt == "png":
        for part in parts:
            rows = [row for row in SyntheticStore(part.path).rows() if row["id"] in found.get(part.index, {})]
            adopt_rows(out, part.path, rows, f"shard{part.index}")
        return SyntheticStore(out).merge()
    for part in parts:
        for path in sorted({p for p in found.get(part.index, {}).values() if isinstance(p, Path)}):
            link_file(path, out / path.name)
    if not (out / MARKER).is_file():
        write_json(out / MARKER, {"format": fmt, "version": 1})
    return ShardedStore(out, fmt).merge()
