"""Synthetic dataset writer: ImageFolder layout plus a CSV manifest, one row per image.

``<root>/<class_name>/<id>.png`` and ``<root>/manifest.csv``. An image file is written to a temporary name
and renamed into place; its manifest row is appended (and flushed) only after the rename. So a row always
names a complete file, a crash leaves at most an orphan temp file, and re-running skips ids already listed.

Several processes (``accelerate launch``) write to one store safely: each appends to its own part file
``manifest.part-<k>.csv``; ``merge()`` (run by one process when all are done) folds every part into
``manifest.csv``, sorted by id and without duplicates, atomically, then removes the parts.

A kill at any moment leaves a store the next run reads correctly. A manifest (or part) is created with its
header atomically (temporary file + rename), so it never exists without one. Every row is checked on read
(:func:`read_manifest`): a row cut short by a kill (no line end), with a field count unlike the header's, an
empty id / path / class, a number that does not parse, or a missing image is dropped with one warning naming
the file and line; the next run regenerates its image. A file whose header is damaged (cut, or glued to a
row) is ignored on read and set aside as ``<name>.damaged`` by the next write, never appended to. Before
appending, the writer rewrites its own file (atomically) without the dropped rows, so nothing is glued to a
cut row. ``longtail verify`` reports all of this without changing anything.

``merge()`` also writes ``metadata.csv`` (atomically, after ``manifest.csv``): the metadata file of Hugging Face
``datasets``' imagefolder loader, so ``load_dataset("imagefolder", data_dir=<root>)`` reads the store with every
manifest column. Its rows are the merged manifest's, plus ``file_name`` (the image path relative to the root) and
``label`` (the class folder: with a metadata file the loader takes labels from it, not from the folders). It is
derived, never read here; a kill before it is replaced leaves the previous one (a subset of the rows, each
image complete) until the next merge.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
HF_METADATA = "metadata.csv"  # Hugging Face datasets' imagefolder metadata, rewritten by merge()
PART_GLOB = "manifest.part-*.csv"
DAMAGED = ".damaged"  # suffix of a manifest set aside because its header is damaged
COLUMNS = (
    "id", "path", "class_id", "class_name", "index", "seed", "prompt", "prompt_full", "weight", "signal_name",
    "signal", "p_class", "pred", "model", "round", "num_steps", "cfg_scale", "seconds",
)
# ``prompt`` is the text the generator's text encoder saw; ``prompt_full`` the prompt as written, only when the
# encoder's token limit cut it (empty otherwise). Manifests written before ``prompt_full`` existed lack it.
ADDED_COLUMNS = ("prompt_full",)
REQUIRED = ("id", "path", "class_name")  # never empty
INTEGERS = ("class_id", "index", "seed", "pred", "round", "num_steps")  # parse as int when not empty
FLOATS = ("weight", "signal", "p_class", "cfg_scale", "seconds")  # parse as float when not empty
AGAIN = "a re-run that needs it makes it again"


def to_uint8(images: Tensor) -> np.ndarray:
    """Generator-range images ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W]`` (C=1) or ``[N, H, W, 3]``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def safe_dirname(name: str) -> str:
    """A class name as a folder name: spaces and path separators become underscores."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip()) or "_"


def _folder_key(name: str) -> str:
    """What decides whether two class folders are the same on disk: NFC (macOS decomposes names) and case
    (macOS and Windows file systems ignore it)."""
    return unicodedata.normalize("NFC", safe_dirname(unicodedata.normalize("NFC", name))).casefold()


def check_class_folders(class_names: Sequence[str]) -> None:
    """Refuse class names that would share one folder (``t shirt`` and ``t_shirt`` both become ``t_shirt/``,
    ``Coat`` and ``coat`` meet on a case-insensitive file system): their images would mix silently."""
    seen: dict[str, str] = {}
    for name in class_names:
        key = _folder_key(name)
        if key in seen:
            first = seen[key]
            detail = "" if safe_dirname(first) == safe_dirname(name) else " on a case-insensitive file system"
            raise ValueError(f"class names {first!r} and {name!r} would both be written to the folder "
                             f"{safe_dirname(first)}/{detail}, mixing their images; rename one of them")
        seen[key] = name


# --- reading and checking ---------------------------------------------------------------------------------


@dataclass
class ManifestCheck:
    """One manifest file as read: its good rows (line, row), one message per dropped row, and ``damaged``
    (why the whole file is unusable) when its header is bad."""

    path: Path
    rows: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    damaged: str | None = None
    header: list[str] | None = None
    empty: bool = False

    @property
    def clean(self) -> bool:
        """True when the file can be appended to as it is: intact header (today's columns), no dropped row."""
        return self.damaged is None and not self.dropped and self.header == list(COLUMNS)


def _header_problem(header: list[str]) -> str | None:
    unknown = [name for name in header if name not in COLUMNS]
    missing = [name for name in COLUMNS if name not in header and name not in ADDED_COLUMNS]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if unknown:
        why = f"unknown column {unknown[0]!r}"
    elif missing:
        why = f"no column {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
    elif repeated:
        why = f"column {repeated[0]!r} twice"
    else:
        return None
    shown = ",".join(header)
    return f"damaged header {shown[:60] + '...' if len(shown) > 60 else shown!r} ({why})"


def _row_problem(row: dict[str, str], root: Path) -> str | None:
    for name in REQUIRED:
        if not row.get(name):
            return f"empty {name}"
    for names, kind in ((INTEGERS, int), (FLOATS, float)):
        for name in names:
            value = row.get(name) or ""
            if value:
                try:
                    kind(value)
                except ValueError:
                    return f"{name} {value!r} is not {'an integer' if kind is int else 'a number'}"
    rel = PurePosixPath(row["path"])
    if rel.is_absolute() or ".." in rel.parts:
        return f"path {row['path']!r} leaves the store"
    if rel.name != f"{row['id']}.png":  # e.g. a cut id with the next row glued on: "c0_0" + "c0_00009,..."
        return f"path {row['path']!r} is not its id's image ({row['id']}.png)"
    if not (root / rel).is_file():
        return f"its image {row['path']} is missing"
    return None


def read_manifest(path: str | Path, root: str | Path | None = None) -> ManifestCheck:
    """Read and check one manifest (or part) file; ``root`` (default: its folder) holds the images.

    Never changes anything. A row is kept only when it ends with a line end (a kill mid-write leaves the last
    row without one), has exactly the header's number of fields, non-empty ``REQUIRED`` columns, numbers that
    parse, and an existing image named by its id (``<folder>/<id>.png``). Rows get every column of ``COLUMNS``
    (empty when the file lacks it).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    check = ManifestCheck(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        check.empty = True
        check.damaged = "empty: no header (killed before its first write?)"
        return check
    complete = text.endswith("\n")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as err:
        check.damaged = f"unreadable header ({err})"
        return check
    if "\n" not in text:
        check.damaged = f"cut header {text[:60]!r} (no line end: killed while writing it)"
        return check
    check.damaged = _header_problem(header)
    if check.damaged:
        return check
    check.header = header
    records: list[tuple[int, list[str]]] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:  # e.g. a quoted field left open by a cut: the rest of the file is that row
            check.dropped.append(f"{path}: line {start} dropped: unreadable ({err}); {AGAIN}")
            break
        if fields:
            records.append((start, fields))
    for n, (start, fields) in enumerate(records):
        ident = fields[0] if fields and fields[0] else None
        label = f"{path}: line {start}" + (f" (id {ident})" if ident else "")
        if n == len(records) - 1 and not complete:
            why = "cut short (no line end: the write was interrupted)"
        elif len(fields) != len(header):
            why = f"{len(fields)} field{'' if len(fields) == 1 else 's'} where the header has {len(header)}"
        else:
            row = {name: "" for name in COLUMNS} | dict(zip(header, fields, strict=True))
            why = _row_problem(row, root)
            if why is None:
                check.rows.append((start, row))
                continue
        check.dropped.append(f"{label} dropped: {why}; {AGAIN}")
    return check


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _write_atomic(path: Path, rows: Iterable[dict[str, object]], columns: Sequence[str] = COLUMNS) -> None:
    """``columns`` header plus ``rows`` to a temporary file, synced, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


HF_COLUMNS = ("file_name", "label", *COLUMNS)


def hf_metadata_rows(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Manifest rows as rows of ``metadata.csv``: ``file_name`` (``path``, relative to the store root) and
    ``label`` (its class folder, what the imagefolder loader would infer without a metadata file) first."""
    return [{"file_name": row["path"], "label": PurePosixPath(row["path"]).parts[0], **row} for row in rows]


def set_aside(path: Path) -> Path:
    """Rename a damaged manifest to ``<name>.damaged`` (``<name>.<n>.damaged`` when taken); returns the name."""
    target = path.with_name(path.name + DAMAGED)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{n}{DAMAGED}")
        n += 1
    os.replace(path, target)
    return target


class SyntheticStore:
    """Append-only writer (and reader) of a synthetic ImageFolder with a manifest."""

    def __init__(self, root: str | Path, part: int | None = None) -> None:
        self.root = Path(root)
        self.manifest = self.root / MANIFEST
        self.writes_to = self.manifest if part is None else self.root / f"manifest.part-{part}.csv"
        rows = self.rows()
        self._ids = {row["id"] for row in rows}
        self._folders = {_folder_key(row["class_name"]): row["class_name"] for row in rows}
        self._ready = False  # writes_to checked (and repaired) for appending

    def _manifests(self) -> list[Path]:
        return ([self.manifest] if self.manifest.is_file() else []) + sorted(self.root.glob(PART_GLOB))

    def check(self) -> list[ManifestCheck]:
        """Every manifest and part file of the store, read and checked (nothing is changed)."""
        return [read_manifest(path, self.root) for path in self._manifests()]

    def rows(self) -> list[dict[str, str]]:
        """Good rows of the manifest and of any part files, first occurrence of each id.

        A dropped row or damaged file is warned about once (naming the file and line); see :func:`read_manifest`.
        """
        seen: dict[str, dict[str, str]] = {}
        for check in self.check():
            if check.empty:
                _warn_once(f"{check.path}: {check.damaged}; ignored, the next write replaces it")
            elif check.damaged:
                _warn_once(f"{check.path}: {check.damaged}; ignored, the next write sets it aside as "
                           f"{check.path.name}{DAMAGED} and a re-run makes its images again")
            for message in check.dropped:
                _warn_once(message)
            for _, row in check.rows:
                seen.setdefault(row["id"], row)
        return list(seen.values())

    def _repair(self, path: Path) -> None:
        """Make ``path`` safe to append to: set a damaged file aside, rewrite one with dropped rows (or an older
        header) without them, create a missing one with its header; each atomically."""
        check = read_manifest(path, self.root) if path.is_file() else None
        if check is not None and check.clean:
            return
        if check is not None and check.damaged:
            if check.empty:
                logger.warning("%s: %s; replaced", path, check.damaged)
            else:
                logger.warning("%s: %s; set aside as %s", path, check.damaged, set_aside(path).name)
            check = None
        _write_atomic(path, [row for _, row in check.rows] if check is not None else [])

    def merge(self) -> int:
        """Fold part files into ``manifest.csv`` (sorted by id, atomic) and delete them; returns the row count.

        A manifest or part with a damaged header is set aside (``.damaged``), not merged.
        """
        for check in self.check():
            if check.damaged and not check.empty:
                logger.warning("%s: %s; set aside as %s", check.path, check.damaged, set_aside(check.path).name)
        rows = sorted(self.rows(), key=lambda r: r["id"])
        parts = sorted(self.root.glob(PART_GLOB))
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.manifest, rows)
        _write_atomic(self.root / HF_METADATA, hf_metadata_rows(rows), HF_COLUMNS)
        for part in parts:
            part.unlink()
        self._ready = self.writes_to == self.manifest
        return len(rows)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, images: np.ndarray, records: Sequence[dict[str, object]]) -> int:
        """Write uint8 images (``[N, H, W]`` or ``[N, H, W, 3]``) with one record each; returns how many were new.

        Each record needs ``id`` and ``class_name``; other ``COLUMNS`` are optional. A class whose folder
        already holds another class of this store (``check_class_folders``) is refused before any write.
        """
        if len(images) != len(records):
            raise ValueError(f"{len(images)} images but {len(records)} records")
        folders = dict(self._folders)
        for record in records:
            name = str(record["class_name"])
            other = folders.setdefault(_folder_key(name), name)
            if other != name:
                raise ValueError(f"{self.root}: class names {other!r} and {name!r} would both be written to the "
                                 f"folder {safe_dirname(other)}/, mixing their images; rename one of them")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._ready:
            self._repair(self.writes_to)
            self._ready = True
        written = 0
        with self.writes_to.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
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
                self._folders.setdefault(_folder_key(str(record["class_name"])), str(record["class_name"]))
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
