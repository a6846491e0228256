"""Cluster shards of ``longtail generate``: which share of the job list a process makes, and where it writes.

``--shard i/n`` makes jobs ``i, i+n, i+2n, ...`` of the job list an unsharded run would make (the list is
fixed by the config: classes, counts, seed), into ``<out>/parts/shard-<i>-of-<n>/``, a complete store of its
own with ``config.yaml``, ``settings.json`` and ``shard.json`` (the plan: per-class counts and the settings
hash). Shards share nothing while they run -- no rendezvous, no shared file -- so a SLURM array or any batch
scheduler can run them, re-run a failed one, or run them months apart; ``longtail merge <out>`` checks and
folds them (``longtail.jobs.merge``).

``--shard auto`` reads the shard from the environment: a SLURM array task (``SLURM_ARRAY_TASK_ID``,
``SLURM_ARRAY_TASK_COUNT``, and ``SLURM_ARRAY_TASK_MIN`` / ``SLURM_ARRAY_TASK_STEP`` when set: task ids
``MIN, MIN+STEP, ...`` become shards ``0, 1, ...``), else torchrun's (and ``accelerate launch``'s) ``RANK`` /
``WORLD_SIZE``, one shard per process. Inside a SLURM-array shard, processes started by ``accelerate launch``
split the shard's jobs as an unsharded run splits all of them (manifest parts, merged by the shard's main
process). A torchrun-sourced shard is one process that waits for no other (no barrier): when a launcher stops
every process after one failed (torchrun does), the finished images of every shard are kept, and ``longtail
merge`` names the shards to re-run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..config import ConfigError

PARTS = "parts"
SHARD_JSON = "shard.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), and where it came from (``--shard``, ``SLURM array``, ``torchrun``)."""

    index: int
    count: int
    source: str = "--shard"

    def take(self, jobs: Sequence[T]) -> list[T]:
        """This shard's jobs: every ``count``-th from ``index`` on (the shards partition ``jobs``)."""
        return list(jobs)[self.index :: self.count]

    @property
    def dirname(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    @property
    def text(self) -> str:
        return f"{self.index}/{self.count}"


def part_dir(out: str | Path, shard: Shard) -> Path:
    """Where ``shard`` of a run into ``out`` writes: ``<out>/parts/shard-<i>-of-<n>/``."""
    return Path(out) / PARTS / shard.dirname


SHARD_DIR = re.compile(r"shard-(\d+)-of-(\d+)")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"--shard auto: ${name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--shard auto: ${name}={value!r} is not an integer") from None


def _checked(index: int, count: int, source: str) -> Shard:
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count} (from {source}): needs 0 <= i < n and n >= 1")
    return Shard(index, count, source)


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """The shard a SLURM array task or a torchrun process is (see the module docstring); ConfigError when the
    environment names neither, or a SLURM array whose task ids are not ``MIN, MIN+STEP, ...``."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_TASK_ID") not in (None, ""):
        task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
        low, step = _int(env, "SLURM_ARRAY_TASK_MIN", 0), max(1, _int(env, "SLURM_ARRAY_TASK_STEP", 1))
        if (task - low) % step:
            raise ConfigError(f"--shard auto: SLURM array task {task} is not MIN + k * STEP ({low} + k * {step}); "
                              "use --array=0-<n-1> or pass --shard i/n")
        return _checked((task - low) // step, count, "SLURM array")
    if env.get("WORLD_SIZE") not in (None, "") and env.get("RANK") not in (None, ""):
        return _checked(_int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun")
    raise ConfigError("--shard auto: neither SLURM array variables (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) "
                      "nor torchrun's (RANK, WORLD_SIZE) are set; pass --shard i/n")


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``"i/n"`` (0-based), ``"auto"`` (:func:`shard_from_env`), or None / empty (no sharding)."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    if text == "auto":
        return shard_from_env(env)
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if match is None:
        raise ConfigError(f"shard (--shard) must be i/n (0-based, e.g. 0/4) or auto, got {text!r}")
    return _checked(int(match.group(1)), int(match.group(2)), "--shard")
