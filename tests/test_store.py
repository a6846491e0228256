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
