"""A synthetic store loads with Hugging Face ``datasets``' imagefolder loader: ``metadata.csv`` (written by
``SyntheticStore.merge``) gives every manifest column, and ``label`` the class folder of each image."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from longtail.data.store import COLUMNS, HF_METADATA, MANIFEST, SyntheticStore


def records(ids: list[str], cls: str, class_id: int) -> list[dict]:
    return [{"id": i, "class_name": cls, "class_id": class_id, "index": n, "seed": 100 + n, "prompt": f"a {cls}",
             "weight": 2.0, "signal_name": "entropy", "signal": 0.25 + n, "p_class": 0.5, "pred": class_id,
             "round": 1} for n, i in enumerate(ids)]


def images(n: int, value: int) -> np.ndarray:
    return np.full((n, 8, 8, 3), value, np.uint8)


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_store(root) -> None:
    """Two writers (manifest parts) merged, then a resumed single writer adds rows and merges again."""
    a, b = SyntheticStore(root, part=0), SyntheticStore(root, part=1)
    a.add(images(2, 10), records(["c0_00000", "c0_00001"], "ankle boot", 9))
    b.add(images(2, 200), records(["c1_00000", "c1_00001"], "coat", 4))
    assert SyntheticStore(root).merge() == 4
    resumed = SyntheticStore(root)
    assert resumed.add(images(2, 10), records(["c0_00001", "c0_00002"], "ankle boot", 9)) == 1  # one already there
    assert SyntheticStore(root).merge() == 5


def test_metadata_follows_the_manifest_after_merge_and_resume(tmp_path):
    root = tmp_path / "store"
    write_store(root)
    manifest, metadata = read_csv(root / MANIFEST), read_csv(root / HF_METADATA)
    assert [r["id"] for r in metadata] == [r["id"] for r in manifest] == [
        "c0_00000", "c0_00001", "c0_00002", "c1_00000", "c1_00001"]
    for meta, row in zip(metadata, manifest, strict=True):
        assert {k: meta[k] for k in COLUMNS} == row  # every manifest column, same values
        assert meta["file_name"] == row["path"] and (root / meta["file_name"]).is_file()
        assert meta["label"] == meta["file_name"].split("/")[0]
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))


def test_metadata_keeps_only_the_good_rows_and_a_killed_merge_keeps_the_previous_one(tmp_path, monkeypatch):
    from longtail.data import store as store_module

    root = tmp_path / "store"
    write_store(root)
    before = (root / HF_METADATA).read_bytes()
    (root / "coat" / "c1_00000.png").unlink()  # a lost image: its row is dropped on read, and from the metadata
    with monkeypatch.context() as patch:  # killed before metadata.csv is renamed into place: the old one stays
        real = store_module.os.replace

        def killed(src, dst):
            if str(dst).endswith(HF_METADATA):
                raise KeyboardInterrupt
            return real(src, dst)

        patch.setattr(store_module.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            SyntheticStore(root).merge()
    assert (root / HF_METADATA).read_bytes() == before
    SyntheticStore(root).merge()  # the next merge makes it consistent again
    assert [r["id"] for r in read_csv(root / HF_METADATA)] == ["c0_00000", "c0_00001", "c0_00002", "c1_00001"]


def test_imagefolder_loads_the_store_offline_with_labels_and_every_column(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    datasets = pytest.importorskip("datasets")

    root = tmp_path / "store"
    write_store(root)
    manifest = {r["id"]: r for r in read_csv(root / MANIFEST)}
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train",
                               cache_dir=str(tmp_path / "hf_home" / "datasets"))

    assert ds.num_rows == len(manifest) == 5
    assert set(ds.column_names) == {"image", "label", *COLUMNS}  # file_name became the decoded `image`
    for example in ds:
        row = manifest[example["id"]]
        assert example["label"] == row["path"].split("/")[0]  # the class folder
        assert example["class_name"] == row["class_name"] and example["path"] == row["path"]
        assert int(example["class_id"]) == int(row["class_id"]) and int(example["seed"]) == int(row["seed"])
        assert example["signal"] == pytest.approx(float(row["signal"]))
        assert example["image"].size == (8, 8)
        assert np.asarray(example["image"].convert("RGB"))[0, 0, 0] == (10 if row["class_name"] == "ankle boot" else 200)
    assert sorted(set(ds["label"])) == ["ankle_boot", "coat"]
