"""Sharded synthetic stores for large runs: Parquet files or WebDataset tar shards, both read by Hugging Face
``datasets`` (``load_dataset("parquet", data_dir=...)``, ``load_dataset("webdataset", data_dir=...)``).

A store holds ``store.json`` (its format), data files ``data-<token>-<n>.parquet`` / ``.tar`` and
``shards.index``. Each :meth:`ShardedStore.add` writes one data file holding a chunk of images (PNG bytes) and
their manifest rows (``longtail.data.store.COLUMNS``, as strings), to a temporary name, synced, then renamed
into place: a data file that exists is complete, so a kill loses at most the chunk being written and never
leaves a row without its image. Several processes write to one store without coordination (each file name
carries a random token). ``shards.index`` lists every data file known at the last :meth:`~ShardedStore.merge`
with its size and ids; start-up reads the index and opens only the data files it does not list (one directory
listing, no stat per row).

Parquet: one row per image, the manifest columns plus ``image`` (``{"bytes", "path"}``, the Hugging Face
``Image`` feature, declared in the schema's ``huggingface`` metadata so ``datasets`` decodes it). WebDataset:
per image two members, ``<id>.png`` and ``<id>.json`` (the row); the id is the sample key, so ids must not
contain a dot. The default store stays the PNG ImageFolder of ``longtail.data.store``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .store import COLUMNS, MANIFEST, SyntheticStore

logger = logging.getLogger(__name__)

FORMATS = ("png", "parquet", "webdataset")
EXTENSIONS = {"parquet": ".parquet", "webdataset": ".tar"}
MARKER = "store.json"
SHARD_INDEX = "shards.index"
DATA_FILE = re.compile(r"data-[0-9a-f]+-\d{6}\.(parquet|tar)")
BAD_ID = re.compile(r"[.\s/\\,]")  # a WebDataset key ends at the first dot; the index separates by , and tabs


def store_format(root: str | Path) -> str | None:
    """The format of the store at ``root``: ``store.json``'s, ``png`` for a folder with a manifest, or None."""
    root = Path(root)
    marker = root / MARKER
    if marker.is_file():
        try:
            fmt = json.loads(marker.read_text())["format"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{marker} is unreadable; it should hold {{\"format\": one of {FORMATS}}}") from None
        return str(fmt)
    if (root / MANIFEST).is_file() or any(root.glob("manifest.part-*.csv")):
        return "png"
    return None


def check_format(root: str | Path, fmt: str) -> None:
    """Refuse an unknown format, or a store at ``root`` that already holds another format (ValueError)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    found = store_format(root)
    if found is not None and found != fmt:
        raise ValueError(f"{root} holds a {found} store; it cannot be continued as {fmt} (use another --out, "
                         f"or --set format={found})")


def open_store(root: str | Path, fmt: str = "png", part: int | None = None) -> SyntheticStore | ShardedStore:
    """The writer for ``fmt`` at ``root``: the PNG ImageFolder (``part``: this process's manifest part) or a
    :class:`ShardedStore`. Raises ValueError for an unknown format or a store of another format."""
    check_format(root, fmt)
    return SyntheticStore(root, part=part) if fmt == "png" else ShardedStore(root, fmt)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image ``[H, W]`` or ``[H, W, 3]`` as PNG file bytes (PIL, the same encoder as the PNG store)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _hf_features() -> dict:
    """The Hugging Face ``datasets`` features of a Parquet data file: every manifest column a string, ``image``
    an Image (what ``datasets.Features.from_arrow_schema`` reads from the schema metadata)."""
    features = {name: {"dtype": "string", "_type": "Value"} for name in COLUMNS}
    return {"info": {"features": {**features, "image": {"_type": "Image"}}}}


def _write_file(path: Path, rows: list[dict[str, str]], images: list[bytes], fmt: str) -> None:
    """One data file with ``rows`` and their PNG ``images``, written to a temporary name, synced, renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: pa.array([row[name] for row in rows], pa.string()) for name in COLUMNS}
        columns["image"] = pa.array([{"bytes": b, "path": f"{row['id']}.png"} for row, b in zip(rows, images, strict=True)],
                                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table(columns).replace_schema_metadata({"huggingface": json.dumps(_hf_features())})
        pq.write_table(table, tmp)
    else:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row, data in zip(rows, images, strict=True):
                for name, payload in ((f"{row['id']}.png", data), (f"{row['id']}.json", json.dumps(row).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_ids(path: Path) -> list[str]:
    """The ids in one data file, reading only its ``id`` column (Parquet) or member names (tar)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["id"]).column("id").to_pylist()
    with tarfile.open(path) as tar:
        return [name[:-5] for name in tar.getnames() if name.endswith(".json")]


def read_file(path: Path, with_images: bool = False) -> list[tuple[dict[str, str], bytes | None]]:
    """Every (row, PNG bytes or None) of one data file; raises (OSError, ValueError ...) when it is unreadable."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[*COLUMNS, "image"] if with_images else list(COLUMNS))
        data = table.to_pydict()
        rows = [{name: data[name][i] or "" for name in COLUMNS} for i in range(table.num_rows)]
        images = [item["bytes"] for item in data["image"]] if with_images else [None] * len(rows)
        return list(zip(rows, images, strict=True))
    out: dict[str, list] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext not in ("json", "png") or (ext == "png" and not with_images):
                continue
            payload = tar.extractfile(member).read()
            entry = out.setdefault(key, [None, None])
            entry[0 if ext == "json" else 1] = json.loads(payload) if ext == "json" else payload
    return [(row, data) for row, data in out.values() if row is not None]


def data_files(root: Path, fmt: str) -> list[Path]:
    """The complete data files of the ``fmt`` store at ``root`` (one directory listing), sorted by name."""
    if not root.is_dir():
        return []
    return sorted(root / n for n in os.listdir(root) if DATA_FILE.fullmatch(n) and n.endswith(EXTENSIONS[fmt]))


def read_shard_index(root: Path) -> dict[str, tuple[int, list[str]]]:
    """``shards.index``: data file name -> (size in bytes, ids); empty when missing, unreadable or cut."""
    try:
        lines = (root / SHARD_INDEX).read_text().split("\n")
        listed = {}
        for line in lines[1:]:
            if line:
                name, size, ids = line.split("\t")
                listed[name] = (int(size), ids.split(","))
        return listed if lines[-1] == "" else {}
    except (OSError, ValueError):
        return {}


_warned: set[str] = set()


def _readable(path: Path, with_images: bool = False) -> list[tuple[dict[str, str], bytes | None]] | None:
    """:func:`read_file`, or None (warned about once per file and reason) when the file cannot be read."""
    try:
        return read_file(path, with_images)
    except Exception as err:  # any reader error means: this file is unusable
        message = f"{path}: unreadable ({err}); ignored, a re-run makes its images again"
        if message not in _warned:
            _warned.add(message)
            logger.warning(message)
        return None


class ShardedStore:
    """Writer (and reader) of a sharded synthetic store: Parquet or WebDataset tar data files, ``shards.index``.

    The same interface as :class:`longtail.data.store.SyntheticStore`: ``id in store``, ``len``, ``add``,
    ``merge``, ``rows``, ``load``."""

    def __init__(self, root: str | Path, fmt: str) -> None:
        if fmt not in EXTENSIONS:
            raise ValueError(f"a sharded store is parquet or webdataset, got {fmt!r}")
        self.root = Path(root)
        self.format = fmt
        self._token = secrets.token_hex(4)
        self._count = 0
        self._files = self._startup()
        self._ids = {i for ids in self._files.values() for i in ids}

    def data_files(self) -> list[Path]:
        """This store's complete data files (one directory listing), sorted by name."""
        return data_files(self.root, self.format)

    def _startup(self) -> dict[str, list[str]]:
        """ids per data file: from the index for the files it lists with their size, else read from the file;
        an unreadable file is warned about and left out (a re-run makes its images again)."""
        listed = read_shard_index(self.root)
        files: dict[str, list[str]] = {}
        for path in self.data_files():
            known = listed.get(path.name)
            if known is not None and known[0] == path.stat().st_size:
                files[path.name] = known[1]
                continue
            try:
                files[path.name] = read_ids(path)
            except Exception as err:
                logger.warning("%s: unreadable (%s); ignored, a re-run makes its images again", path, err)
        return files

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, images: np.ndarray, records: Sequence[dict[str, object]]) -> int:
        """Write uint8 images (``[N, H, W]`` or ``[N, H, W, 3]``) and their records as one data file; returns how
        many were new. Ids already in the store are skipped; an id with a dot, comma, slash or white space is
        refused (ValueError) before anything is written."""
        if len(images) != len(records):
            raise ValueError(f"{len(images)} images but {len(records)} records")
        rows, data, taken = [], [], set()
        for image, record in zip(images, records, strict=True):
            image_id = str(record["id"])
            if BAD_ID.search(image_id) or not image_id:
                raise ValueError(f"id {image_id!r} cannot name a sample of a {self.format} store (no dot, comma, "
                                 "slash or space)")
            if image_id in self._ids or image_id in taken:
                continue
            taken.add(image_id)
            row = {name: "" if record.get(name) is None else str(record.get(name)) for name in COLUMNS}
            row["path"] = f"{image_id}.png"
            rows.append(row)
            data.append(png_bytes(image))
        if not rows:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MARKER).is_file():
            from ..files import write_json

            write_json(self.root / MARKER, {"format": self.format, "version": 1})
        name = f"data-{self._token}-{self._count:06d}{EXTENSIONS[self.format]}"
        self._count += 1
        _write_file(self.root / name, rows, data, self.format)
        self._files[name] = [row["id"] for row in rows]
        self._ids.update(self._files[name])
        return len(rows)

    def merge(self) -> int:
        """Rewrite ``shards.index`` from the data files now present (atomically); returns the image count.

        An id in two files (which the writer never makes) is counted once and warned about."""
        self._files = self._startup()
        seen: set[str] = set()
        for name, ids in self._files.items():
            twice = seen.intersection(ids)
            if twice:
                logger.warning("%s: %d id(s) already in another data file, e.g. %s", self.root / name, len(twice),
                               sorted(twice)[0])
            seen.update(ids)
        self._ids = seen
        if self.root.is_dir():
            self.write_index()
        return len(seen)

    def write_index(self) -> None:
        """``shards.index``: a header line, then ``name<TAB>size<TAB>id,id,...`` per data file; atomic."""
        path = self.root / SHARD_INDEX
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as f:
            f.write(json.dumps({"version": 1, "format": self.format}) + "\n")
            for name, ids in self._files.items():
                f.write(f"{name}\t{(self.root / name).stat().st_size}\t{','.join(ids)}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def rows(self) -> list[dict[str, str]]:
        """Every row of every readable data file, first occurrence of each id, sorted by id."""
        seen: dict[str, dict[str, str]] = {}
        for path in self.data_files():
            for row, _ in _readable(path) or []:
                seen.setdefault(row["id"], row)
        return [seen[i] for i in sorted(seen)]

    def images(self, ids: Iterable[str] | None = None) -> dict[str, bytes]:
        """PNG bytes by id (all, or only ``ids``)."""
        wanted = set(ids) if ids is not None else None
        out: dict[str, bytes] = {}
        for path in self.data_files():
            for row, data in _readable(path, with_images=True) or []:
                if (wanted is None or row["id"] in wanted) and data is not None:
                    out.setdefault(row["id"], data)
        return out

    def load(self, class_names: Sequence[str], ids: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read images (uint8) and class ids back, optionally only ``ids``; class ids follow ``class_names``."""
        lookup = {name: i for i, name in enumerate(class_names)}
        rows = {row["id"]: row for row in self.rows()}
        found = self.images(ids)
        images, labels = [], []
        for image_id in sorted(found):
            name = rows[image_id]["class_name"]
            if name not in lookup:
                raise ValueError(f"{self.root}: class {name!r} is not one of {list(class_names)}")
            images.append(np.asarray(Image.open(io.BytesIO(found[image_id]))))
            labels.append(lookup[name])
        return np.stack(images) if images else np.empty((0,)), np.asarray(labels, dtype=np.int64)
