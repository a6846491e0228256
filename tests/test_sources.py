from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from helpers import fake_fashion_mnist
from longtail.data.imagefolder import ImageIndex, Preprocess
from longtail.data.sources import FashionMNISTLT, ImageFolderSource, Recipe, label_counts, seeded_loader
from longtail.data.store import SyntheticStore


def drawn_labels(loader: DataLoader, epochs: int) -> torch.Tensor:
    """The labels of every example ``loader`` yields over ``epochs`` passes."""
    return torch.cat([batch[1] for _ in range(epochs) for batch in loader])


def fractions(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)


def test_class_balanced_sampler_draws_each_class_about_equally():
    y = torch.cat([torch.full((90,), 0), torch.full((9,), 1), torch.full((1,), 2)])
    ds = TensorDataset(torch.zeros(100, 1), y)
    loader = seeded_loader(ds, 20, seed=0, sampling="class_balanced", labels=y)
    draws = drawn_labels(loader, 30)
    assert len(draws) == 3000  # num_samples = the dataset's size, per epoch
    assert (fractions(draws, 3) - 1 / 3).abs().max() < 0.05, fractions(draws, 3)
    again = drawn_labels(seeded_loader(ds, 20, seed=0, sampling="class_balanced", labels=y), 30)
    other = drawn_labels(seeded_loader(ds, 20, seed=1, sampling="class_balanced", labels=y), 30)
    assert torch.equal(draws, again) and not torch.equal(draws, other)  # seeded
    uniform = drawn_labels(seeded_loader(ds, 20, seed=0, labels=y), 30)
    assert torch.equal(torch.bincount(uniform), torch.tensor([2700, 270, 30]))  # each example once per epoch


def test_uniform_sampling_is_the_seeded_shuffle_as_before():
    ds = TensorDataset(torch.arange(50).float(), torch.arange(50) % 3)
    new = [b[0] for b in seeded_loader(ds, 8, seed=3)]
    gen = torch.Generator().manual_seed(3)
    old = [b[0] for b in DataLoader(ds, batch_size=8, shuffle=True, generator=gen)]
    assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))


def test_sampling_settings_are_validated():
    allowed = r"Recipe\.sampling must be one of 'uniform', 'class_balanced'; got 'shuffle'"
    with pytest.raises(ValueError, match=allowed):
        Recipe(sampling="shuffle")
    ds = TensorDataset(torch.zeros(4), torch.arange(4))
    with pytest.raises(ValueError, match=r"Recipe\.sampling"):
        seeded_loader(ds, 2, 0, sampling="balanced")
    with pytest.raises(ValueError, match="needs the labels of all 4 examples"):
        seeded_loader(ds, 2, 0, sampling="class_balanced")
    with pytest.raises(ValueError, match="labels span"):
        label_counts([0, 3], 3)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> FashionMNISTLT:
    root = fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), per_class_train=30, per_class_test=2)
    return FashionMNISTLT(str(root), n_max=30, imbalance=10.0)


def add_synthetic(store_root: Path, names: list[str], per_class: dict[int, int], size: int) -> list[dict]:
    """``per_class[c]`` random ``size`` x ``size`` images of class ``c`` in a store; returns its rows."""
    store = SyntheticStore(store_root)
    records = [{"id": f"{c}-{i}", "class_name": names[c]} for c, n in per_class.items() for i in range(n)]
    rng = np.random.default_rng(0)
    store.add(rng.integers(0, 255, (len(records), size, size), dtype=np.uint8), records)
    return store.rows()


def test_fashion_counts_and_class_balanced_loader(fashion, tmp_path):
    names = fashion.class_names
    assert fashion.class_counts() == fashion.train_counts == [30, 23, 18, 14, 11, 8, 6, 5, 4, 3]
    rows = add_synthetic(tmp_path / "store", names, {9: 7, 0: 2}, 32)
    counts = fashion.class_counts(rows)
    assert counts == [32, 23, 18, 14, 11, 8, 6, 5, 4, 10]
    uniform = fashion.train_loader(Recipe(batch_size=16), seed=0, rows=rows, store_root=tmp_path / "store")
    assert torch.bincount(drawn_labels(uniform, 1), minlength=10).tolist() == counts  # the loader's dataset
    assert fashion.class_counts(rows) == label_counts(uniform.dataset.tensors[1], 10)
    balanced = fashion.train_loader(Recipe(batch_size=16, sampling="class_balanced"), seed=0, rows=rows,
                                    store_root=tmp_path / "store")
    draws = drawn_labels(balanced, 20)
    assert len(draws) == 20 * sum(counts)
    assert (fractions(draws, 10) - 0.1).abs().max() < 0.03, fractions(draws, 10)
    with pytest.raises(ValueError, match="'unicorn' is not one of"):
        fashion.class_counts([{"id": "x", "class_name": "unicorn"}])


def test_fashion_uniform_loader_is_unchanged(fashion):
    loader = fashion.train_loader(Recipe(batch_size=16), seed=5)
    old = DataLoader(TensorDataset(fashion.train_x, fashion.train_y), batch_size=16, shuffle=True,
                     generator=torch.Generator().manual_seed(5), drop_last=len(fashion.train_x) % 16 == 1)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(loader, old, strict=True))


def test_imagefolder_counts_and_class_balanced_loader(tmp_path):
    names = ["cat", "dog", "emu"]
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c, n in enumerate((18, 4, 2)):
        for i in range(n):
            paths.append(tmp_path / "train" / names[c] / f"{i}.png")
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8), "L").save(paths[-1])
            labels.append(c)
    index = ImageIndex(paths, labels, names)
    source = ImageFolderSource(index, index, Preprocess(size=8, mean=(0.5,), std=(0.5,), channels=1))
    rows = add_synthetic(tmp_path / "store", names, {2: 4}, 10)
    counts = source.class_counts(rows)
    assert source.class_counts() == [18, 4, 2] and counts == [18, 4, 6]
    uniform = source.train_loader(Recipe(batch_size=7), seed=0, rows=rows, store_root=tmp_path / "store")
    assert torch.bincount(drawn_labels(uniform, 1), minlength=3).tolist() == counts
    balanced = source.train_loader(Recipe(batch_size=7, sampling="class_balanced", crop="center"), seed=0,
                                   rows=rows, store_root=tmp_path / "store")
    draws = drawn_labels(balanced, 40)
    assert len(draws) == 40 * 28
    assert (fractions(draws, 3) - 1 / 3).abs().max() < 0.05, fractions(draws, 3)
    with pytest.raises(ValueError, match=r"Recipe\.sampling"):
        bad = Recipe()
        bad.sampling = "oversample"
        source.train_loader(bad, seed=0)
    with pytest.raises(ValueError, match="'fox' is not one of"):
        source.train_loader(Recipe(), seed=0, rows=[{"id": "x", "class_name": "fox", "path": "x.png"}],
                            store_root=tmp_path)


def test_the_judges_real_reference_from_an_imagefolder_is_in_the_decoder_range(tmp_path):
    """An ImageFolder's evaluation images come in the classifier's normalisation (here ImageNet's); the judge
    takes [-1, 1], so the sweep's real reference is mapped back: pixel p -> p / 127.5 - 1, exactly."""
    from types import SimpleNamespace

    from PIL import Image

    from longtail.data.imagefolder import Preprocess, scan_imagefolder
    from longtail.data.sources import ImageFolderSource
    from longtail.jobs.stages import real_reference

    values = {"a": (0, 64, 128), "b": (200, 255, 30)}
    for name, rgb in values.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name / "0.png")
    index = scan_imagefolder(tmp_path)
    source = ImageFolderSource(index, index, Preprocess(size=8, crop_pct=1.0))
    images, labels = real_reference(SimpleNamespace(source=source), per_class=1)
    assert labels.tolist() == [0, 1]
    for i, name in enumerate(("a", "b")):
        expected = torch.tensor(values[name], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(images[i].mean(dim=(1, 2)), expected, atol=1e-5), name
