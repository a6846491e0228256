import numpy as np
import pytest

from longtail.data.store import SyntheticStore


def records(ids, cls="ankle boot"):
    return [{"id": i, "class_name": cls, "class_id": 9, "seed": n} for n, i in enumerate(ids)]


def test_write_read_and_skip_existing(tmp_path):
    store = SyntheticStore(tmp_path / "s")
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    assert store.add(images, records(["a", "b", "c"])) == 3
    assert (tmp_path / "s" / "ankle_boot" / "a.png").is_file()
    # a re-run with overlapping ids writes only the new one, and the manifest has no duplicates
    again = SyntheticStore(tmp_path / "s")
    assert again.add(images, records(["b", "c", "d"])) == 1
    rows = again.rows()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    x, y = again.load(["t-shirt"] * 9 + ["ankle boot"], ids=["a", "c"])
    assert np.array_equal(x, images[[0, 2]]) and y.tolist() == [9, 9]
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_rows_without_files_are_ignored_and_unknown_classes_rejected(tmp_path):
    store = SyntheticStore(tmp_path)
    store.add(np.zeros((2, 4, 4), np.uint8), records(["a", "b"]))
    (tmp_path / "ankle_boot" / "b.png").unlink()
    assert [r["id"] for r in SyntheticStore(tmp_path).rows()] == ["a"]
    with pytest.raises(ValueError, match="ankle boot"):
        store.load(["cat", "dog"])


def test_lengths_must_match(tmp_path):
    with pytest.raises(ValueError, match="2 images but 1 records"):
        SyntheticStore(tmp_path).add(np.zeros((2, 4, 4), np.uint8), records(["a"]))


def test_parts_from_several_writers_merge_into_one_manifest(tmp_path):
    a, b = SyntheticStore(tmp_path, part=0), SyntheticStore(tmp_path, part=1)
    a.add(np.zeros((2, 4, 4), np.uint8), records(["x2", "x0"]))
    b.add(np.ones((2, 4, 4), np.uint8), records(["x1", "x3"]))
    assert sorted(SyntheticStore(tmp_path).rows(), key=lambda r: r["id"]) == sorted(
        a.rows(), key=lambda r: r["id"])
    assert SyntheticStore(tmp_path).merge() == 4
    assert not list(tmp_path.glob("manifest.part-*"))
    assert [r["id"] for r in SyntheticStore(tmp_path).rows()] == ["x0", "x1", "x2", "x3"]
    # a later writer sees the merged ids as existing
    assert SyntheticStore(tmp_path, part=3).add(np.zeros((1, 4, 4), np.uint8), records(["x1"])) == 0


def test_a_resume_checks_only_the_rows_written_after_the_index(tmp_path, monkeypatch):
    from longtail.data import store as store_module

    SyntheticStore(tmp_path).add(np.zeros((3, 4, 4), np.uint8), records(["a", "b", "c"]))
    assert SyntheticStore(tmp_path).merge() == 3 and (tmp_path / store_module.INDEX).is_file()
    SyntheticStore(tmp_path).add(np.ones((1, 4, 4), np.uint8), records(["d"]))  # appended after the index
    checked: list[str] = []
    real = store_module._row_problem
    monkeypatch.setattr(store_module, "_row_problem", lambda row, *a: checked.append(row["id"]) or real(row, *a))
    resumed = SyntheticStore(tmp_path)
    assert sorted(resumed._ids) == ["a", "b", "c", "d"] and checked == ["d"]
    assert resumed.add(np.zeros((2, 4, 4), np.uint8), records(["c", "e"])) == 1 and checked == ["d", "d"]
    again = SyntheticStore(tmp_path)
    checked.clear()
    assert again.merge() == 5 and sorted(checked) == ["a", "b", "c", "d", "e"]  # a merge checks every row once


def test_an_index_that_no_longer_matches_the_manifest_is_not_trusted(tmp_path):
    import os

    SyntheticStore(tmp_path).add(np.zeros((3, 4, 4), np.uint8), records(["a", "b", "c"]))
    SyntheticStore(tmp_path).merge()
    manifest = tmp_path / "manifest.csv"
    text = manifest.read_bytes()
    copy = tmp_path / "copy.csv"
    copy.write_bytes(text.replace(b"\r\nc,", b"\r\nz,"))  # another file (new inode) with a row changed
    os.replace(copy, manifest)
    assert sorted(SyntheticStore(tmp_path)._ids) == ["a", "b"]  # z's path is not its id's image: dropped
    SyntheticStore(tmp_path).add(np.zeros((1, 4, 4), np.uint8), records(["c"]))
    SyntheticStore(tmp_path).merge()
    with manifest.open("r+b") as f:  # cut in place (same inode): the last row loses its line end
        f.truncate(len(manifest.read_bytes()) - 5)
    assert sorted(SyntheticStore(tmp_path)._ids) == ["a", "b"]


def test_a_full_read_lists_each_class_folder_once_instead_of_a_stat_per_row(tmp_path, monkeypatch):
    from pathlib import Path

    SyntheticStore(tmp_path).add(np.zeros((20, 4, 4), np.uint8), records([f"x{i:02d}" for i in range(20)]))
    calls = []
    real = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: calls.append(self.name) or real(self))
    assert len(SyntheticStore(tmp_path).rows()) == 20
    assert calls.count("manifest.csv") >= 1 and not [c for c in calls if c.endswith(".png")]
