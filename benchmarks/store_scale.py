"""Resume time and memory of a synthetic store with many rows, for each store format.

Builds a store of ``--rows`` images (10 classes) in every format with the stores' own file writers -- the PNG
ImageFolder (``manifest.csv``; the images are empty files: start-up never opens them), Parquet and WebDataset
tar data files (every image the same small PNG, ``--per-file`` rows per data file) -- lets each store write its
index as a finished run does (``merge()``), then times a resume in a fresh process: open the store and
filter the run's job ids down to those still to make (none here), as ``longtail generate`` does on a re-run.
Peak memory is that process's peak resident set size during the resume (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, Linux), interpreter and imports included; ``before`` is its resident size just before.

Each format is measured with its index (``manifest.index`` / ``shards.index``), with the index plus rows written
after it (a run killed after its last merge: ``--tail`` rows, checked in full), and without an index (the
fallback: every row read and checked, one directory listing per class folder); last, the merge that ends a run
(open + every row checked + manifest, index and, for PNG, metadata.csv rewritten). Goal: a resume of 1M rows under
5 s and 1 GB. ``python benchmarks/store_scale.py`` (1M rows; about 20 min and 3 GB of disk on a 2-core machine,
removed afterwards); ``--rows 10000`` for a quick look.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def job_ids(rows: int) -> list[tuple[int, int, str]]:
    """(class, index, id) of ``rows`` jobs spread over the classes, ids as ``longtail.generate.job_id``."""
    per = -(-rows // len(CLASSES))
    out = [(c, i, f"c{c}_{i:05d}") for c in range(len(CLASSES)) for i in range(per)]
    return out[:rows]


def record(c: int, i: int, image_id: str, path: str) -> dict[str, object]:
    """A manifest row like the ones ``longtail generate`` writes (guided, with signal and P(class))."""
    return {"id": image_id, "path": path, "class_id": c, "class_name": CLASSES[c], "index": i,
            "seed": 1_000_003 * c + 7919 * i, "prompt": f"a photo of a {CLASSES[c]}", "prompt_full": "",
            "weight": 1.0, "signal_name": "total", "signal": f"{0.5 + (i % 97) / 100:.6f}",
            "p_class": f"{(i % 89) / 89:.6f}", "pred": c, "model": "embedded:shipped", "round": "",
            "num_steps": 20, "cfg_scale": 3.0, "seconds": "0.0123"}


def build_png(root: Path, jobs: list[tuple[int, int, str]]) -> None:
    from longtail.data.store import COLUMNS, SyntheticStore, safe_dirname

    root.mkdir(parents=True)
    for name in CLASSES:
        (root / safe_dirname(name)).mkdir()
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for c, i, image_id in jobs:
            path = f"{safe_dirname(CLASSES[c])}/{image_id}.png"
            os.close(os.open(root / path, os.O_CREAT | os.O_WRONLY, 0o644))
            writer.writerow(record(c, i, image_id, path))
    SyntheticStore(root).merge()  # as at the end of a run: manifest.index, metadata.csv


def add_png_tail(root: Path, jobs: list[tuple[int, int, str]]) -> None:
    """Rows appended after the index, as a run killed after its last merge leaves them."""
    from longtail.data.store import COLUMNS, safe_dirname

    with (root / "manifest.csv").open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        for c, i, image_id in jobs:
            path = f"{safe_dirname(CLASSES[c])}/{image_id}.png"
            os.close(os.open(root / path, os.O_CREAT | os.O_WRONLY, 0o644))
            writer.writerow(record(c, i, image_id, path))


def build_sharded(root: Path, fmt: str, jobs: list[tuple[int, int, str]], per_file: int) -> None:
    import numpy as np

    from longtail.data.store_formats import EXTENSIONS, MARKER, ShardedStore, _write_file, png_bytes
    from longtail.files import write_json

    root.mkdir(parents=True)
    write_json(root / MARKER, {"format": fmt, "version": 1})
    image = png_bytes(np.zeros((28, 28), np.uint8))
    rows = len(jobs)

    def write(part: list[tuple[int, int, str]], n: int) -> None:
        rows_ = [{k: str(v) for k, v in record(c, i, image_id, f"{image_id}.png").items()} for c, i, image_id in part]
        _write_file(root / f"data-00000000-{n:06d}{EXTENSIONS[fmt]}", rows_, [image] * len(rows_), fmt)

    for n, start in enumerate(range(0, rows, per_file)):
        write(jobs[start : min(start + per_file, rows)], n)
    ShardedStore(root, fmt).merge()  # shards.index, as at the end of a run


MEASURE = """
import json, sys, time
fmt, root, total, rows, op = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6]
from longtail.data.store_formats import open_store
sys.path.insert(0, sys.argv[5])
from store_scale import job_ids
ids = [image_id for _, _, image_id in job_ids(total)[:rows]]
def status(key):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (VmHWM) to the current one: the import transients drop out
base = status("VmRSS")
start = time.perf_counter()
store = open_store(root, fmt)
todo = [i for i in ids if i not in store]
if op == "merge":
    store.merge()
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "base_mb": base / 1024, "todo": len(todo),
                  "known": len(store)}))
"""


def measure(fmt: str, root: Path, total: int, rows: int, op: str = "resume") -> dict:
    """Resume in a fresh process: open the store, filter the first ``rows`` of ``job_ids(total)``; its time and
    peak memory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, fmt, str(root), str(total), str(rows),
                           str(Path(__file__).parent), op],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="manifest rows (images) per store")
    parser.add_argument("--tail", type=int, default=1000, help="rows written after the index (killed run)")
    parser.add_argument("--per-file", type=int, default=1000, help="rows per Parquet / tar data file")
    parser.add_argument("--formats", default="png,parquet,webdataset")
    parser.add_argument("--dir", default=None, help="where to build the stores (default: a temporary folder)")
    args = parser.parse_args()
    from longtail.data.store import INDEX
    from longtail.data.store_formats import SHARD_INDEX

    work = Path(args.dir or tempfile.mkdtemp(prefix="store_scale_"))
    print(f"$ python benchmarks/store_scale.py --rows {args.rows} --tail {args.tail} --per-file {args.per_file}")
    print(f"{args.rows:,} rows, 10 classes; resume = open the store + filter the job ids, in a fresh process; "
          "peak = its peak RSS meanwhile, before = its RSS before (interpreter and imports)")
    print(f"{'format':<11} {'store state':<36} {'build s':>8} {'seconds':>8} {'peak MB':>8} {'before MB':>9}")
    total = args.rows + args.tail
    jobs = job_ids(total)
    try:
        for fmt in args.formats.split(","):
            root = work / fmt
            started = time.perf_counter()
            if fmt == "png":
                build_png(root, jobs[: args.rows])
            else:
                build_sharded(root, fmt, jobs[: args.rows], args.per_file)
            built: float | None = time.perf_counter() - started
            index = root / (INDEX if fmt == "png" else SHARD_INDEX)
            states = [("indexed (after a merge)", None)]
            if args.tail:
                states.append((f"indexed + {args.tail:,} rows after it", "tail"))
            states.append(("no index (read every row)", "noindex"))
            states.append(("merge: check all, rewrite the index", "merge"))
            for label, change in states:
                if change == "tail":
                    if fmt == "png":
                        add_png_tail(root, jobs[args.rows :])
                    else:
                        build_tail_file(root, fmt, jobs[args.rows :])
                elif change == "noindex":
                    index.unlink()
                m = measure(fmt, root, total, args.rows + (args.tail if change else 0),
                            "merge" if change == "merge" else "resume")
                assert m["todo"] == 0, m
                shown = f"{built:.1f}" if built is not None else ""
                print(f"{fmt:<11} {label:<36} {shown:>8} {m['seconds']:>8.2f} {m['peak_mb']:>8.0f} "
                      f"{m['base_mb']:>9.0f}")
                built = None
            shutil.rmtree(root)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"build s: writing the store and its first merge (index); peak memory of this script (building, "
          f"merges included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def build_tail_file(root: Path, fmt: str, part: list[tuple[int, int, str]]) -> None:
    """One data file of the rows ``part``, written after the index."""
    import numpy as np

    from longtail.data.store_formats import EXTENSIONS, _write_file, png_bytes

    image = png_bytes(np.zeros((28, 28), np.uint8))
    rows_ = [{k: str(v) for k, v in record(c, i, image_id, f"{image_id}.png").items()} for c, i, image_id in part]
    _write_file(root / f"data-ffffffff-{0:06d}{EXTENSIONS[fmt]}", rows_, [image] * len(rows_), fmt)


if __name__ == "__main__":
    main()
