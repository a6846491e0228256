"""Synthetic dataset writer: ImageFolder layout plus a CSV manifest, one row per image.

``<root>/<class_name>/<id>.png`` and ``<root>/manifest.csv``. An image file is written to a temporary name
and renamed into place; its manifest row is appended (and flushed) only after the rename. So a row always
names a complete file, a crash leaves at most an orphan temp file, and re-running skips ids already listed.

Several processes (``accelerate launch``) write to one store safely: each appends to its own part file
``manifest.part-<k>.csv``; ``merge()`` (run by one process when all are done) folds every part into
``manifest.csv``, sorted by id and without duplicates, atomically, then removes the parts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

MANIFEST = "manifest.csv"
PART_GLOB = "manifest.part-*.csv"
COLUMNS = (
    "id", "path", "class_id", "class_name", "index", "seed", "prompt", "weight", "signal_name", "signal", "p_class",
    "pred", "model", "round", "num_steps", "cfg_scale", "seconds",
)


def to_uint8(images: Tensor) -> np.ndarray:
    """Generator-range images ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W]`` (C=1) or ``[N, H, W, 3]``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def safe_dirname(name: str) -> str:
    """A class name as a folder name: spaces and path separators become underscores."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip()) or "_"


class SyntheticStore:
    """Append-only writer (and reader) of a synthetic ImageFolder with a manifest."""

    def __init__(self, root: str | Path, part: int | None = None) -> None:
        self.root = Path(root)
        self.manifest = self.root / MANIFEST
        self.writes_to = self.manifest if part is None else self.root / f"manifest.part-{part}.csv"
        self._ids = {row["id"] for row in self.rows()}

    def _manifests(self) -> list[Path]:
        return ([self.manifest] if self.manifest.is_file() else []) + sorted(self.root.glob(PART_GLOB))

    def rows(self) -> list[dict[str, str]]:
        """Rows of the manifest and of any part files whose image exists, first occurrence of each id."""
        seen: dict[str, dict[str, str]] = {}
        for path in self._manifests():
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    if row["id"] not in seen and (self.root / row["path"]).is_file():
                        seen[row["id"]] = row
        return list(seen.values())

    def merge(self) -> int:
        """Fold part files into ``manifest.csv`` (sorted by id, atomic) and delete them; returns the row count."""
        rows = sorted(self.rows(), key=lambda r: r["id"])
        parts = sorted(self.root.glob(PART_GLOB))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (MANIFEST + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.manifest)
        for part in parts:
            part.unlink()
        return len(rows)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, images: np.ndarray, records: Sequence[dict[str, object]]) -> int:
        """Write uint8 images (``[N, H, W]`` or ``[N, H, W, 3]``) with one record each; returns how many were new.

        Each record needs ``id`` and ``class_name``; other ``COLUMNS`` are optional.
        """
        if len(images) != len(records):
            raise ValueError(f"{len(images)} images but {len(records)} records")
        self.root.mkdir(parents=True, exist_ok=True)
        new_file = not self.writes_to.is_file()
        written = 0
        with self.writes_to.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            for image, record in zip(images, records, strict=True):
                image_id = str(record["id"])
                if image_id in self._ids:
                    continue
                rel = Path(safe_dirname(str(record["class_name"]))) / f"{image_id}.png"
                path = self.root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                Image.fromarray(image).save(tmp, format="PNG")
                os.replace(tmp, path)
                writer.writerow({**record, "path": rel.as_posix()})
                f.flush()
                self._ids.add(image_id)
                written += 1
        return written

    def load(self, class_names: Sequence[str], ids: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read images (uint8) and class ids back, optionally only ``ids``; class ids follow ``class_names``."""
        wanted = set(ids) if ids is not None else None
        lookup = {name: i for i, name in enumerate(class_names)}
        images, labels = [], []
        for row in self.rows():
            if wanted is not None and row["id"] not in wanted:
                continue
            if row["class_name"] not in lookup:
                raise ValueError(f"{self.manifest}: class {row['class_name']!r} is not one of {list(class_names)}")
            images.append(np.asarray(Image.open(self.root / row["path"])))
            labels.append(lookup[row["class_name"]])
        return np.stack(images) if images else np.empty((0,)), np.asarray(labels, dtype=np.int64)
