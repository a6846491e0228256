import pytest
import torch

from longtail.augment import AUGMENTATIONS, cutout, gridmask, make_augment
from longtail.heads import oracle_loss
from longtail.train import TrainConfig, fit


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_baseline_keeps_shapes_and_range(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    y = torch.arange(6) % 3
    out, target = make_augment(name, 3)(x, y, gen)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    if name == "cutmix":
        assert target.shape == (6, 3) and torch.allclose(target.sum(1), torch.ones(6))
    else:
        assert torch.equal(target, y)
    again, _ = make_augment(name, 3)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded by our generator, not the global RNG


def test_cutout_and_gridmask_blank_part_of_the_image():
    x = torch.ones(4, 1, 16, 16)
    x[:, :, 0, 0] = -1  # background level
    gen = torch.Generator().manual_seed(1)
    for fn in (cutout, gridmask):
        out, _ = fn(x, torch.zeros(4), gen)
        dropped = (out == -1).float().mean(dim=(1, 2, 3))
        assert (dropped > 0.02).all() and (dropped < 0.9).all()


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown augmentation"):
        make_augment("mixup2", 3)


def test_soft_targets_in_oracle_loss_and_training(tiny_cnn):
    logits = torch.randn(5, 3, 4)
    hard = torch.tensor([0, 1, 2, 3, 0])
    soft = torch.nn.functional.one_hot(hard, 4).float()
    assert torch.allclose(oracle_loss(logits, hard), oracle_loss(logits, soft))
    hist = fit(tiny_cnn, (torch.randn(16, 1, 8, 8), torch.arange(16) % 4),
               TrainConfig(epochs=1, batch_size=8, augment="cutmix"), show=False)
    assert len(hist) == 1 and hist[0] > 0
