"""Sharded store formats (Parquet, WebDataset tar): the same images as the PNG store, merged from shards,
read back by Hugging Face ``datasets`` offline, resumed from ``shards.index`` without opening indexed files."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from longtail.config import ConfigError
from longtail.data import store_formats
from longtail.data.store_formats import SHARD_INDEX, ShardedStore, open_store, store_format
from longtail.jobs.generate import run_generate
from longtail.jobs.merge import merge_parts
from longtail.verify import verify
from test_shards import config, manifest

CLASSES = "classes=[coat, bag]"


@pytest.fixture(scope="module")
def png_reference(tmp_path_factory):
    """An unsharded PNG run: id -> pixels."""
    out = tmp_path_factory.mktemp("png") / "out"
    run_generate(config(out, "per_class=2", CLASSES), show=False, log=lambda m: None)
    return {row["id"]: np.asarray(Image.open(out / row["path"])) for row in manifest(out)}


@pytest.mark.parametrize(("fmt", "ext"), [("parquet", "parquet"), ("webdataset", "tar")])
def test_sharded_formats_merge_to_the_png_runs_images_and_load_with_hf_datasets(
        tmp_path, monkeypatch, png_reference, fmt, ext):
    out = tmp_path / "out"
    for k in range(2):
        run_generate(config(out, "per_class=2", CLASSES, f"shard={k}/2", f"format={fmt}"), show=False,
                     log=lambda m: None)
    result = merge_parts(out, log=lambda m: None)
    assert result.ok and result.merged == 4 and store_format(out) == fmt
    assert len(list(out.glob(f"data-*.{ext}"))) == 4  # chunk=1: one data file per image
    assert sorted(r["id"] for r in ShardedStore(out, fmt).rows()) == sorted(png_reference)
    from longtail.report import load_run, write_report

    run = load_run(out)  # `longtail report` on a sharded generate run: its rows, no gallery of missing files
    assert run.kind == "generate" and sorted(r["id"] for r in run.manifest) == sorted(png_reference)
    assert "4 images" in write_report(out).read_text()
    from longtail.data.datasets import DataError
    from longtail.evaluation.run import check_imagefolder

    with pytest.raises(DataError, match=rf"is a {fmt} store; evaluate reads ImageFolders"):
        check_imagefolder(str(out))

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(fmt, data_files=str(out / f"*.{ext}"), split="train",
                               cache_dir=str(tmp_path / "hf" / "datasets"))
    assert ds.num_rows == 4
    for example in ds:
        row, image = (example, example["image"]) if fmt == "parquet" else (example["json"], example["png"])
        assert row["class_name"] in ("coat", "bag") and row["path"] == f"{row['id']}.png"
        assert np.array_equal(np.asarray(image), png_reference[row["id"]])


def test_a_store_of_another_format_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    run_generate(config(out, "per_class=1", "classes=[coat]"), show=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="holds a png store; it cannot be continued as parquet"):
        run_generate(config(out, "per_class=1", "classes=[coat]", "format=parquet"), show=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="format must be one of png, parquet, webdataset, got 'jpeg'"):
        run_generate(config(tmp_path / "b", "format=jpeg"), show=False, log=lambda m: None)
    with pytest.raises(ValueError, match="cannot name a sample"):
        open_store(tmp_path / "c", "webdataset").add(np.zeros((1, 4, 4), np.uint8), [{"id": "a.b", "class_name": "x"}])


def records(ids: list[str]) -> list[dict]:
    return [{"id": i, "class_name": "coat", "class_id": 4, "seed": n} for n, i in enumerate(ids)]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_resume_reads_only_the_data_files_the_index_does_not_list(tmp_path, monkeypatch, caplog, fmt):
    store = ShardedStore(tmp_path, fmt)
    pixels = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    assert store.add(pixels, records(["a0", "a1"])) == 2 and store.add(pixels, records(["a1", "b0"])) == 1
    assert store.merge() == 3 and (tmp_path / SHARD_INDEX).is_file()
    store.add(pixels[:1], records(["c0"]))  # after the index: a resume must open this file
    opened = []
    real = store_formats.read_ids
    monkeypatch.setattr(store_formats, "read_ids", lambda path: opened.append(path.name) or real(path))
    resumed = ShardedStore(tmp_path, fmt)
    assert sorted(resumed._ids) == ["a0", "a1", "b0", "c0"] and len(opened) == 1
    assert "a1" in resumed and resumed.add(pixels, records(["a0", "b0"])) == 0  # nothing written twice
    images, labels = resumed.load(["t-shirt"] * 4 + ["coat"], ids=["a1", "b0"])
    assert np.array_equal(images, pixels[[1, 1]]) and labels.tolist() == [4, 4]

    newest = max(tmp_path.glob("data-*"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:50])  # damaged by hand (the writer renames only whole files)
    with caplog.at_level(logging.WARNING, logger="longtail.data.store_formats"):
        assert ShardedStore(tmp_path, fmt).merge() == 3
    assert "unreadable" in caplog.text and newest.name in caplog.text
    verdict = verify(tmp_path)
    assert verdict.problems == 1 and f"{newest}: unreadable" in verdict.lines[0]
    assert verdict.lines[-2] == f"{tmp_path}: 3 images in 3 {fmt} file(s)"
    decoded = Image.open(io.BytesIO(ShardedStore(tmp_path, fmt).images(["a0"])["a0"]))
    assert np.array_equal(np.asarray(decoded), pixels[0])
