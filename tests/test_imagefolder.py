import numpy as np
import pytest
import torch
from PIL import Image

from longtail.data.datasets import DataError
from longtail.data.imagefolder import (
    ImageListDataset,
    Preprocess,
    eval_transform,
    read_class_names,
    scan_imagefolder,
    train_transform,
)
from longtail.train import TrainConfig, fit_loader, predict_loader


def make_folder(root, classes=("cat", "dog"), per_class=3, size=20, mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def test_scan_orders_by_folder_or_given_names(tmp_path):
    make_folder(tmp_path)
    idx = scan_imagefolder(tmp_path)
    assert idx.class_names == ["cat", "dog"] and idx.counts() == [3, 3]
    idx = scan_imagefolder(tmp_path, ["dog", "cat"])
    assert idx.labels[:3] == [0, 0, 0] and idx.paths[0].parent.name == "dog"


def test_class_mismatch_missing_and_empty_folders_are_named(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError, match=r"missing folders \['bird'\]"):
        scan_imagefolder(tmp_path, ["cat", "dog", "bird"])
    with pytest.raises(DataError, match=r"folders not among the classes \['dog'\]"):
        scan_imagefolder(tmp_path, ["cat"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        scan_imagefolder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        scan_imagefolder(tmp_path / "nope")


def test_corrupt_images_fail_or_are_skipped_and_reported(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "cat" / "broken.png"
    bad.write_bytes((tmp_path / "cat" / "0.png").read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        scan_imagefolder(tmp_path)
    idx = scan_imagefolder(tmp_path, allow_corrupt=True)
    assert len(idx.paths) == 6 and idx.skipped[0][0].endswith("broken.png")


def test_class_name_files(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n\ndog\n")
    (tmp_path / "b.json").write_text('["cat", "dog"]')
    assert read_class_names(tmp_path / "a.txt") == read_class_names(tmp_path / "b.json") == ["cat", "dog"]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_transforms_and_loader_training(tmp_path, mode):
    make_folder(tmp_path, mode=mode, size=24)
    channels = 1 if mode == "L" else 3
    pre = Preprocess(size=16, mean=(0.5,) * channels, std=(0.5,) * channels, channels=channels)
    idx = scan_imagefolder(tmp_path)
    ds = ImageListDataset(idx.paths, idx.labels, train_transform(pre), mode=pre.mode)
    x, y = ds[0]
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32 and y == 0
    assert eval_transform(pre)(Image.open(idx.paths[0]).convert(pre.mode)).shape == (channels, 16, 16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True)
    losses = fit_loader(model, loader, TrainConfig(epochs=2, lr=1e-2), show=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    out, labels = predict_loader(model, torch.utils.data.DataLoader(ds, batch_size=4))
    assert out.logits.shape == (6, 2) and labels.tolist() == idx.labels
