"""Fashion-MNIST IDX reading, the long-tail profile and the Many / Medium / Few groups."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from longtail.data import datasets
from longtail.data.datasets import (
    FASHION_MNIST_CLASSES,
    DataError,
    class_groups,
    from_model_range,
    group_of,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
    read_idx,
    to_model_range,
)

REAL_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Serialise a uint8 array as IDX (optionally with a forged magic number)."""
    if magic is None:
        magic = 0x0800 + array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_split(directory: Path, prefix: str, n: int = 12, n_labels: int | None = None, seed: int = 0) -> None:
    """Write a small synthetic split (``n`` images, labels 0..9) as gzipped IDX files."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n if n_labels is None else n_labels) % 10).astype(np.uint8)
    write(directory / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(images))
    write(directory / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(labels))


# --------------------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_read_idx_round_trip_gz_and_plain(tmp_path: Path, name: str) -> None:
    array = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    out = read_idx(write(tmp_path / name, idx_bytes(array)), ndim=3)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, array)
    out.flags.writeable = True  # a private copy, not a view on immutable bytes


def test_read_idx_labels(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "l.gz", idx_bytes(labels)), ndim=1), labels)


def test_truncated_payload_names_file_and_sizes(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100]
    path = write(tmp_path / "train-images-idx3-ubyte.gz", data)
    expected = r"train-images-idx3-ubyte\.gz: truncated: header says 10x28x28 = 7840 bytes, file has 7740"
    with pytest.raises(DataError, match=expected):
        read_idx(path)


def test_trailing_bytes_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "x.gz", idx_bytes(np.zeros((3,), np.uint8)) + b"\0")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(path)


def test_wrong_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "bad-magic.gz", idx_bytes(np.zeros((2, 2, 2), np.uint8), magic=0x12340803))
    with pytest.raises(DataError, match=r"bad-magic\.gz: bad magic number"):
        read_idx(path)


def test_wrong_dimension_count(tmp_path: Path) -> None:
    path = write(tmp_path / "labels-as-images.gz", idx_bytes(np.zeros((4,), np.uint8)))
    with pytest.raises(DataError, match=r"labels-as-images\.gz: bad magic number 2049.*expected 2051"):
        read_idx(path, ndim=3)


def test_wrong_dtype_code(tmp_path: Path) -> None:
    path = write(tmp_path / "floats.gz", idx_bytes(np.zeros((4,), np.uint8), magic=0x00000D01))
    with pytest.raises(DataError, match=r"floats\.gz: unsupported IDX dtype code 0x0d"):
        read_idx(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    path = tmp_path / "corrupt.gz"
    path.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])
    with pytest.raises(DataError, match=r"corrupt\.gz: corrupt gzip stream"):
        read_idx(path)
    path.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(DataError, match=r"corrupt\.gz: corrupt gzip stream"):
        read_idx(path)


def test_gz_name_without_gzip_content(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.zeros((2,), np.uint8)))
    with pytest.raises(DataError, match=r"plain\.gz: .*not a gzip stream"):
        read_idx(path)


# --------------------------------------------------------------------------------------------------------
# load_fashion_mnist


def test_load_synthetic_split(tmp_path: Path) -> None:
    fake_split(tmp_path, "train", n=12)
    fake_split(tmp_path, "t10k", n=7, seed=1)
    images, labels = load_fashion_mnist("train", data_dir=tmp_path)
    assert images.shape == (12, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (12,) and labels.dtype == torch.int64
    assert labels.tolist() == [i % 10 for i in range(12)]
    test_images, _ = load_fashion_mnist("test", data_dir=tmp_path)
    assert test_images.shape == (7, 28, 28)


def test_load_uses_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_split(tmp_path / "env", "train", n=5)
    monkeypatch.setenv("LONGTAIL_FASHION_MNIST_DIR", str(tmp_path / "env"))
    images, _ = load_fashion_mnist("train")
    assert images.shape[0] == 5


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val", data_dir=tmp_path)


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    fake_split(tmp_path, "train", n=12, n_labels=11)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz holds 12 images.*train-labels-idx1"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    fake_split(tmp_path, "train", n=3)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.array([0, 10, 2], np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: label 10 out of range 0\.\.9"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_missing_files_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "LONGTAIL_FASHION_MNIST_DIR" in message and "download=True" in message
    assert str(tmp_path / "nowhere") in message

    monkeypatch.setenv("LONGTAIL_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test")


class FakeWeb:
    """Stands in for ``urllib.request.urlopen``: serves bytes by file name, records the URLs asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.urls = files, []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        self.urls.append(url)
        return io.BytesIO(self.files[url.rsplit("/", 1)[-1]])


def synthetic_official_files() -> dict[str, bytes]:
    files = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(np.zeros((n, 28, 28), np.uint8)))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    return files


def test_download_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    web = FakeWeb(synthetic_official_files())
    monkeypatch.setattr(datasets.urllib.request, "urlopen", web)
    images, labels = load_fashion_mnist("train", data_dir=tmp_path / "dl", download=True)
    assert images.shape == (20, 28, 28) and labels.shape == (20,)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(datasets.FILES)
    assert all(url.startswith(datasets.FASHION_MNIST_URL) for url in web.urls) and len(web.urls) == 4
    # files already present are not fetched again
    load_fashion_mnist("test", data_dir=tmp_path / "dl", download=True)
    assert len(web.urls) == 4


def test_download_refuses_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = synthetic_official_files()
    files["train-images-idx3-ubyte.gz"] = files["train-images-idx3-ubyte.gz"][:-30]  # half-written download
    monkeypatch.setattr(datasets.urllib.request, "urlopen", FakeWeb(files))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_fashion_mnist("train", data_dir=tmp_path, download=True)
    assert not (tmp_path / "train-images-idx3-ubyte.gz").exists()
    assert not list(tmp_path.glob("*.part"))


def test_download_error_cleans_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float | None = None) -> io.BytesIO:
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="unreachable"):
        load_fashion_mnist("train", data_dir=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not REAL_TRAIN.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist() -> None:
    images, labels = load_fashion_mnist("train", data_dir=REAL_TRAIN.parent)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.bincount(minlength=10).tolist() == [6000] * 10
    test_images, test_labels = load_fashion_mnist("test", data_dir=REAL_TRAIN.parent)
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)
    assert len(FASHION_MNIST_CLASSES) == 10


# --------------------------------------------------------------------------------------------------------
# pixel ranges


def test_to_model_range_shape_range_and_padding() -> None:
    images = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    images[1] = 0
    images[2, 0, 0] = 128
    x = to_model_range(images)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1.0).all()  # black padding
    assert (x[0, 0, 2:30, 2:30] == 1.0).all()
    assert x[2, 0, 2, 2].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)


def test_from_model_range_inverts_and_clamps() -> None:
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    back = from_model_range(to_model_range(images))
    assert back.shape == (4, 32, 32) and back.dtype == torch.uint8
    assert torch.equal(back[:, 2:30, 2:30], images)
    assert from_model_range(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2)).tolist() == [[[0, 255]]]


# --------------------------------------------------------------------------------------------------------
# long-tail profile and groups


def test_longtail_counts_default_profile() -> None:
    assert longtail_counts() == [1000, 599, 359, 215, 129, 77, 46, 28, 17, 10]
    assert longtail_counts(500, 10, 3) == [500, 158, 50]
    assert longtail_counts(50, 1, 4) == [50, 50, 50, 50]


@pytest.mark.parametrize("kwargs", [{"n_max": 0}, {"imbalance": 0.5}, {"num_classes": 1}])
def test_longtail_counts_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        longtail_counts(**kwargs)


def test_longtail_indices_counts_and_seeds() -> None:
    shuffle = torch.randperm(500, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(10).repeat_interleave(50)[shuffle]
    counts = [50, 30, 18, 11, 7, 4, 3, 2, 1, 0]
    idx = longtail_indices(labels, counts, seed=0)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    assert len(set(idx.tolist())) == idx.numel() == sum(counts)
    assert labels[idx].bincount(minlength=10).tolist() == counts
    assert torch.equal(idx, longtail_indices(labels, counts, seed=0))
    assert not torch.equal(idx, longtail_indices(labels, counts, seed=1))


def test_longtail_indices_too_few() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="class 1: asked for 3 examples but only 2 are available"):
        longtail_indices(labels, [2, 3])


def test_groups_of_default_profile() -> None:
    groups = class_groups(longtail_counts())
    assert groups == ["many"] * 5 + ["medium"] * 3 + ["few"] * 2
    assert [group_of(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
