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

Start-up does not grow with a stat call per row. ``merge()`` also writes ``manifest.index``: the ids of the
checked ``manifest.csv`` and a fingerprint of the bytes they came from (inode, size, SHA-256 of the last
64 KiB). A store opened for writing (a resume) takes its ids from the index when the fingerprint matches, and
checks only the rows appended after it (and any part files) in full; otherwise it reads everything. Full reads
(``rows()``, ``merge()``, ``longtail verify``) find images with one directory listing per class folder, not a
stat per row. An image deleted by hand after a merge is therefore found by the next merge or ``longtail
verify``, not by the start-up of a resume.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
INDEX = "manifest.index"  # ids of the checked manifest.csv and the fingerprint of its bytes, rewritten by merge()
HF_METADATA = "metadata.csv"  # Hugging Face datasets' imagefolder metadata, rewritten by merge()
PART_GLOB = "manifest.part-*.csv"
DAMAGED = ".damaged"  # suffix of a manifest set aside because its header is damaged
COLUMNS = (
    "id", "path", "class_id", "class_name", "index", "seed", "prompt", "prompt_full", "weight", "signal_name",
    "signal", "p_class", "pred", "model", "round", "num_steps", "cfg_scale", "seconds", "vae_dtype",
)
# ``prompt`` is the text the generator's text encoder saw; ``prompt_full`` the prompt as written, only when the
# encoder's token limit cut it (empty otherwise). Manifests written before ``prompt_full`` existed lack it.
# ``vae_dtype``: the dtype the VAE decoded the image in (``float32`` after a half-precision VAE's non-finite decode
# made it fall back; empty where the job did not record it).
ADDED_COLUMNS = ("prompt_full", "vae_dtype")
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


class FolderListing:
    """Whether an image exists, from one directory listing per class folder (``os.listdir``), so that checking N
    rows costs one listing per folder instead of N stat calls. A listing is taken once, at first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._names: dict[str, set[str]] = {}

    def __call__(self, rel: PurePosixPath) -> bool:
        folder = rel.parent.as_posix()
        names = self._names.get(folder)
        if names is None:
            try:
                names = set(os.listdir(self.root / folder))
            except (FileNotFoundError, NotADirectoryError):
                names = set()
            self._names[folder] = names
        return rel.name in names


def _row_problem(row: dict[str, str], root: Path, exists: FolderListing | None = None) -> str | None:
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
    if not (exists(rel) if exists is not None else (root / rel).is_file()):
        return f"its image {row['path']} is missing"
    return None


def read_manifest(path: str | Path, root: str | Path | None = None, *, start: int = 0, first_line: int = 2,
                  exists: FolderListing | None = None) -> ManifestCheck:
    """Read and check one manifest (or part) file; ``root`` (default: its folder) holds the images.

    Never changes anything. A row is kept only when it ends with a line end (a kill mid-write leaves the last
    row without one), has exactly the header's number of fields, non-empty ``REQUIRED`` columns, numbers that
    parse, and an existing image named by its id (``<folder>/<id>.png``). Rows get every column of ``COLUMNS``
    (empty when the file lacks it). ``start`` (bytes) checks only the rows from that offset on, the header
    always (the rows before it were checked earlier: ``manifest.index``); ``first_line`` is the line number
    of the row at ``start``, for messages. Images are found through ``exists`` (default: one
    :class:`FolderListing` for this call, no stat per row).
    """
    check = ManifestCheck(Path(path))
    check.rows = list(iter_manifest(check, root, start=start, first_line=first_line, exists=exists))
    return check


def _row_or_why(fields: list[str], header: list[str], root: Path, exists: FolderListing,
                cut: bool) -> tuple[dict[str, str] | None, str | None]:
    """One record as a row, or why it is dropped (``cut``: the file ends inside it)."""
    if cut:
        return None, "cut short (no line end: the write was interrupted)"
    if len(fields) != len(header):
        return None, f"{len(fields)} field{'' if len(fields) == 1 else 's'} where the header has {len(header)}"
    row = {name: "" for name in COLUMNS} | dict(zip(header, fields, strict=True))
    why = _row_problem(row, root, exists)
    return (row, None) if why is None else (None, why)


def iter_manifest(check: ManifestCheck, root: str | Path | None = None, *, start: int = 0, first_line: int = 2,
                  exists: FolderListing | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """The good rows (line, row) of the file ``check.path``, one at a time, as :func:`read_manifest` keeps them;
    a damaged header, empty file or dropped row is recorded in ``check``. Reads the file as a stream, so a
    caller that keeps only ids holds no more than those."""
    path = check.path
    root = Path(root) if root is not None else path.parent
    exists = exists if exists is not None else FolderListing(root)
    shift = first_line - 2 if start > 0 else 0
    size = path.stat().st_size
    with path.open("rb") as raw:
        head = raw.read(1 << 16)
        if not head.decode("utf-8", errors="replace").strip() and size <= len(head):
            check.empty = True
            check.damaged = "empty: no header (killed before its first write?)"
            return
        raw.seek(max(0, size - 1))
        complete = raw.read(1) == b"\n"
        raw.seek(0)
        first = raw.readline().decode("utf-8", errors="replace")
        try:
            header = next(csv.reader(io.StringIO(first, newline="")))
        except (csv.Error, StopIteration) as err:
            check.damaged = f"unreadable header ({err})"
            return
        if not first.endswith("\n"):
            check.damaged = f"cut header {first[:60]!r} (no line end: killed while writing it)"
            return
        check.damaged = _header_problem(header)
        if check.damaged:
            return
        check.header = header
        if start > 0:
            raw.seek(max(start, raw.tell()))
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=""))
        pending: tuple[int, list[str]] | None = None
        while True:
            line = reader.line_num + 2 + shift
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # e.g. a quoted field left open by a cut: the rest of the file is that row
                check.dropped.append(f"{path}: line {line} dropped: unreadable ({err}); {AGAIN}")
                break
            if not fields:
                continue
            if pending is not None:
                yield from _judged(check, pending, header, root, exists, cut=False)
            pending = (line, fields)
        if pending is not None:
            yield from _judged(check, pending, header, root, exists, cut=not complete)


def _judged(check: ManifestCheck, record: tuple[int, list[str]], header: list[str], root: Path,
            exists: FolderListing, cut: bool) -> Iterator[tuple[int, dict[str, str]]]:
    line, fields = record
    row, why = _row_or_why(fields, header, root, exists, cut)
    if row is not None:
        yield line, row
        return
    ident = fields[0] if fields and fields[0] else None
    label = f"{check.path}: line {line}" + (f" (id {ident})" if ident else "")
    check.dropped.append(f"{label} dropped: {why}; {AGAIN}")


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


def _write_lines_atomic(path: Path, columns: Sequence[str], lines: Iterable[str]) -> None:
    """A CSV header of ``columns`` plus ready CSV ``lines`` (each with its line end), as :func:`_write_atomic`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerow(columns)
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


HF_COLUMNS = ("file_name", "label", *COLUMNS)


def set_aside(path: Path) -> Path:
    """Rename a damaged manifest to ``<name>.damaged`` (``<name>.<n>.damaged`` when taken); returns the name."""
    target = path.with_name(path.name + DAMAGED)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{n}{DAMAGED}")
        n += 1
    os.replace(path, target)
    return target


FINGERPRINT_BYTES = 1 << 16  # the manifest bytes hashed into the index's fingerprint (its last 64 KiB)


@dataclass
class IndexedPrefix:
    """What ``manifest.index`` vouches for: the ids (and class folders) of the first ``size`` bytes of
    ``manifest.csv``, which hold ``lines`` line ends."""

    ids: set[str]
    folders: dict[str, str]
    size: int
    lines: int


def _fingerprint(path: Path, size: int) -> dict[str, object]:
    """Inode, byte count and SHA-256 of the last ``FINGERPRINT_BYTES`` of the first ``size`` bytes of ``path``:
    a rewrite (new inode), a cut (shorter) or an edit near the end no longer matches; appends keep it."""
    with path.open("rb") as f:
        f.seek(max(0, size - FINGERPRINT_BYTES))
        tail = f.read(min(size, FINGERPRINT_BYTES))
    return {"inode": path.stat().st_ino, "size": size, "tail_sha256": hashlib.sha256(tail).hexdigest()}


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
    return count


def write_index(root: Path, ids: Sequence[str], folders: dict[str, str]) -> Path | None:
    """Write ``manifest.index`` for the ``manifest.csv`` now in ``root``, whose good rows have ``ids``: a JSON
    header line (fingerprint, line count, class folders), then one id per line; atomically. Ids with a line
    end cannot be listed: then the index is removed (start-up reads the whole manifest) and None returned."""
    path = root / INDEX
    if any("\n" in i or "\r" in i for i in ids):
        path.unlink(missing_ok=True)
        return None
    manifest = root / MANIFEST
    size = manifest.stat().st_size
    header = {"version": 1, "manifest": {**_fingerprint(manifest, size), "lines": _count_lines(manifest)},
              "folders": folders}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(f"{i}\n" for i in ids)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_index(root: Path) -> IndexedPrefix | None:
    """The ids ``manifest.index`` vouches for, or None when there is no index, it is unreadable or cut, or
    ``manifest.csv`` no longer starts with the bytes it was written for (see :func:`_fingerprint`)."""
    manifest = root / MANIFEST
    try:
        text = (root / INDEX).read_text()
        head, _, body = text.partition("\n")
        fp = json.loads(head)["manifest"]
        size, lines, inode, digest = int(fp["size"]), int(fp["lines"]), fp["inode"], fp["tail_sha256"]
        folders = dict(json.loads(head).get("folders") or {})
        st = manifest.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not text.endswith("\n") or st.st_ino != inode or st.st_size < size:
        return None
    if _fingerprint(manifest, size)["tail_sha256"] != digest:
        return None
    ids = set(body.split("\n"))
    ids.discard("")
    return IndexedPrefix(ids, folders, size, lines)


def _warn_about(check: ManifestCheck) -> None:
    """Warn once about a damaged file and each dropped row of ``check`` (naming the file and line)."""
    if check.empty:
        _warn_once(f"{check.path}: {check.damaged}; ignored, the next write replaces it")
    elif check.damaged:
        _warn_once(f"{check.path}: {check.damaged}; ignored, the next write sets it aside as "
                   f"{check.path.name}{DAMAGED} and a re-run makes its images again")
    for message in check.dropped:
        _warn_once(message)


def link_file(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link (a copy where links fail, e.g. across file systems) under
    a temporary name, renamed into place; nothing to do when ``dst`` already is ``src``."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def adopt_rows(root: Path, source: Path, rows: Sequence[dict[str, str]], tag: str) -> Path:
    """Bring checked ``rows`` of the store at ``source`` into the store at ``root``: each image linked into
    place (:func:`link_file`), then the rows written as the part file ``manifest.part-<tag>.csv`` (atomically),
    which the next ``merge()`` folds. A kill at any point leaves ``root`` readable and ``source`` untouched."""
    for row in rows:
        link_file(source / row["path"], root / row["path"])
    part = root / f"manifest.part-{tag}.csv"
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(part, rows)
    return part


def _first_rows(checks: list[ManifestCheck]) -> list[dict[str, str]]:
    """The good rows of ``checks``, first occurrence of each id; warns about each check (:func:`_warn_about`)."""
    seen: dict[str, dict[str, str]] = {}
    for check in checks:
        _warn_about(check)
        for _, row in check.rows:
            seen.setdefault(row["id"], row)
    return list(seen.values())


class SyntheticStore:
    """Append-only writer (and reader) of a synthetic ImageFolder with a manifest."""

    def __init__(self, root: str | Path, part: int | None = None) -> None:
        self.root = Path(root)
        self.manifest = self.root / MANIFEST
        self.writes_to = self.manifest if part is None else self.root / f"manifest.part-{part}.csv"
        self._ids, self._folders = self._startup()
        self._ready = False  # writes_to checked (and repaired) for appending

    def _startup(self) -> tuple[set[str], dict[str, str]]:
        """The ids and class folders already written: from ``manifest.index`` plus the rows appended after it
        when the index matches, else from every row; part files are always read in full. Warns as ``rows()``."""
        indexed = read_index(self.root)
        ids = indexed.ids if indexed is not None else set()
        folders = dict(indexed.folders) if indexed is not None else {}
        listing = FolderListing(self.root)
        names: set[str] = set()
        for path in self._manifests():
            check = ManifestCheck(path)
            tail = {"start": indexed.size, "first_line": indexed.lines + 1} if (
                indexed is not None and path == self.manifest) else {}
            for _, row in iter_manifest(check, self.root, exists=listing, **tail):  # ids only: rows not kept
                ids.add(row["id"])
                if row["class_name"] not in names:
                    names.add(row["class_name"])
                    folders.setdefault(_folder_key(row["class_name"]), row["class_name"])
            _warn_about(check)
        return ids, folders

    def _manifests(self) -> list[Path]:
        return ([self.manifest] if self.manifest.is_file() else []) + sorted(self.root.glob(PART_GLOB))

    def check(self) -> list[ManifestCheck]:
        """Every manifest and part file of the store, read and checked (nothing is changed)."""
        listing = FolderListing(self.root)
        return [read_manifest(path, self.root, exists=listing) for path in self._manifests()]

    def rows(self) -> list[dict[str, str]]:
        """Good rows of the manifest and of any part files, first occurrence of each id.

        A dropped row or damaged file is warned about once (naming the file and line); see :func:`read_manifest`.
        """
        return _first_rows(self.check())

    def _repair(self, path: Path) -> None:
        """Make ``path`` safe to append to: set a damaged file aside, rewrite one with dropped rows (or an older
        header) without them, create a missing one with its header; each atomically. A ``manifest.csv`` that
        ``manifest.index`` vouches for needs only its appended rows checked."""
        indexed = read_index(self.root) if path == self.manifest else None
        if indexed is not None and read_manifest(path, self.root, start=indexed.size,
                                                 first_line=indexed.lines + 1).clean:
            return
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

        Every row is checked in full (see :func:`read_manifest`); then ``manifest.index`` and ``metadata.csv``
        are rewritten. A manifest or part with a damaged header is set aside (``.damaged``), not merged.
        """
        encoded: dict[str, tuple[str, str]] = {}  # id -> (path, CSV line): a million rows in a few hundred MB
        folders: dict[str, str] = {}
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        listing = FolderListing(self.root)
        parts = sorted(self.root.glob(PART_GLOB))
        for path in self._manifests():
            check = ManifestCheck(path)
            for _, row in iter_manifest(check, self.root, exists=listing):
                if row["id"] not in encoded:
                    writer.writerow([row[name] for name in COLUMNS])
                    encoded[row["id"]] = (row["path"], buffer.getvalue())
                    buffer.seek(0)
                    buffer.truncate()
                    folders.setdefault(_folder_key(row["class_name"]), row["class_name"])
            if check.damaged and not check.empty:
                logger.warning("%s: %s; set aside as %s", check.path, check.damaged, set_aside(check.path).name)
            else:
                _warn_about(check)
        ids = sorted(encoded)
        self.root.mkdir(parents=True, exist_ok=True)
        _write_lines_atomic(self.manifest, COLUMNS, (encoded[i][1] for i in ids))
        write_index(self.root, ids, folders)

        def metadata_lines() -> Iterator[str]:  # file_name (the image path), label (its class folder), the row
            for i in ids:
                rel, line = encoded[i]
                writer.writerow([rel, PurePosixPath(rel).parts[0]])
                head = buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
                yield head[:-2] + "," + line  # the "\r\n" of the two-field row replaced by the row's fields

        _write_lines_atomic(self.root / HF_METADATA, HF_COLUMNS, metadata_lines())
        for part in parts:
            part.unlink()
        self._ready = self.writes_to == self.manifest
        return len(ids)

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
