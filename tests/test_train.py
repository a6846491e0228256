import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from longtail.data.imagefolder import ImageListDataset, Preprocess, train_transform
from longtail.heads import EpistemicClassifier
from longtail.train import TrainConfig, cosine_schedule, fit, fit_loader, predict, tensor_loader


def small_cnn(num_classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def toy_set(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by brightness: dark (-0.6) vs bright (+0.6) 8x8 images plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (y.float() * 1.2 - 0.6).view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 1, 8, 8, generator=gen)
    return x, y


@pytest.fixture
def lrs():
    """The learning rate of every Adam step taken while the fixture is active."""
    seen: list[float] = []

    def hook(opt, args, kwargs):
        if type(opt) is torch.optim.Adam:
            seen.append(opt.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(hook)
    yield seen
    handle.remove()


def test_fit_learns_a_separable_toy_set_with_heads():
    x, y = toy_set()
    model = EpistemicClassifier(small_cnn(), num_heads=3, head_name="5")
    hist = fit(model, (x, y), TrainConfig(epochs=12, batch_size=8, lr=1e-2), show=False)
    assert len(hist) == 12 and hist[-1] < 0.5 * hist[0]
    out = predict(model, x)
    assert (out.logits.argmax(-1) == y).float().mean() == 1.0
    assert out.head_logits is not None and out.head_logits.shape == (32, 3, 2)
    assert not model.training  # left in eval mode


def test_same_seed_same_weights_on_the_tensor_path():
    x, y = toy_set()
    cfg = TrainConfig(epochs=2, batch_size=8, augment="cutout")

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = small_cnn()
        fit(model, (x, y), TrainConfig(**{**cfg.__dict__, "seed": seed}), show=False)
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed drives shuffling and augmentation


def test_tensor_loader_drops_only_a_final_batch_of_one():
    x, y = toy_set(17)
    assert [len(b[0]) for b in tensor_loader(x, y, TrainConfig(batch_size=8))] == [8, 8]
    assert [len(b[0]) for b in tensor_loader(x[:16], y[:16], TrainConfig(batch_size=6))] == [6, 6, 4]
    w = torch.ones(17)
    assert len(next(iter(tensor_loader(x, y, TrainConfig(batch_size=8), weights=w)))) == 3
    with pytest.raises(ValueError, match="differ in length"):
        tensor_loader(x, y[:3], TrainConfig())


def test_per_example_weights_change_training():
    x, y = toy_set(16)

    def run(w: torch.Tensor) -> torch.Tensor:
        model = small_cnn()
        fit(model, (x, y, w), TrainConfig(epochs=1, batch_size=8), show=False)
        return model[-1].weight.detach().clone()

    ones = run(torch.ones(16))
    assert torch.equal(ones, run(torch.full((16,), 3.0)))  # weights are normalised per batch
    assert not torch.equal(ones, run(torch.linspace(0.1, 1.0, 16)))


def linear_loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    x, y = toy_set(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def closed_form(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * step / total))


def test_lr_follows_the_closed_form_cosine(lrs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    fit(model, linear_loader(), TrainConfig(epochs=4, lr=1e-2), show=False)  # 3 steps per epoch: S = 12
    assert len(lrs) == 12
    for s in (0, 6, 11):  # first, middle (lr / 2), last step
        assert lrs[s] == pytest.approx(closed_form(1e-2, s, 12), rel=1e-12)
    assert lrs[0] == 1e-2 and lrs[6] == pytest.approx(5e-3)
    assert lrs == pytest.approx([closed_form(1e-2, s, 12) for s in range(12)], rel=1e-12)


def test_lr_schedule_resumes_across_calls(lrs):
    cfg = TrainConfig(epochs=4, lr=1e-2)
    torch.manual_seed(0)
    fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), linear_loader(), cfg, show=False)
    whole = list(lrs)
    lrs.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    fit(model, linear_loader(), cfg, first_epoch=0, last_epoch=2, total_epochs=4, show=False)
    assert len(lrs) == 6
    fit(model, linear_loader(), cfg, first_epoch=2, last_epoch=4, total_epochs=4, show=False)
    assert lrs == whole and len(whole) == 12
    with pytest.raises(ValueError, match="epochs"):
        fit(model, linear_loader(), cfg, first_epoch=3, last_epoch=5, total_epochs=4, show=False)


def test_cosine_schedule_starts_mid_way_on_a_fresh_optimizer():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = cosine_schedule(opt, total_steps=10, start_step=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(0.1, 6, 10))
    with pytest.raises(ValueError, match="start_step"):
        cosine_schedule(opt, total_steps=10, start_step=11)


def test_oracle_loss_reaches_only_the_winning_head():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    model = EpistemicClassifier(base, num_heads=4, head_name="3")
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 2])
    with torch.no_grad():
        heads = model(x).head_logits  # [2, 4, 3]
        per_head = torch.nn.functional.cross_entropy(heads.transpose(1, 2), y.view(-1, 1).expand(-1, 4),
                                                     reduction="none")
    winners = set(per_head.argmin(1).tolist())
    grads: list[torch.Tensor] = []
    model.heads.weight.register_hook(lambda g: grads.append(g.clone()))
    base_before = base[1].weight.detach().clone()
    fit(model, DataLoader(TensorDataset(x, y), batch_size=2), TrainConfig(epochs=1), show=False)
    assert len(grads) == 1 and len(winners) < 4
    for k in range(4):
        assert (grads[0][k].abs().sum() > 0) == (k in winners), k
    assert not torch.equal(base[1].weight, base_before)  # the base learns from cross-entropy


class Recorder(nn.Module):
    """A tiny classifier that keeps every batch it is fed."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
        self.seen: list[torch.Tensor] = []
        self.net(torch.zeros(1, channels, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def min_pixels(batches: list[torch.Tensor]) -> torch.Tensor:
    """Per image, how many pixels equal the image's minimum."""
    x = torch.cat(batches)
    return (x == x.amin(dim=(1, 2, 3), keepdim=True)).flatten(1).sum(1)


@pytest.mark.parametrize("augment", ["cutout", None])
def test_cutout_fills_with_the_image_minimum_on_both_paths(tmp_path, augment):
    # Cutout's box (side 4 of 16, centre anywhere) covers at least 3x3 pixels; noise images almost never tie
    # at their minimum, so >= 9 pixels at the minimum is the box, and it is never a 0-filled box.
    gen = torch.Generator().manual_seed(0)
    x, y = 0.2 + 0.8 * torch.rand(12, 1, 16, 16, generator=gen), torch.arange(12) % 2
    cfg = TrainConfig(epochs=1, batch_size=4, rotation=0, translate=0, hflip=False, augment=augment)
    tensors = Recorder()
    fit(tensors, (x, y), cfg, show=False)

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(60, 255, (20, 20), dtype=np.uint8), "L").save(paths[-1])
    pre = Preprocess(size=16, mean=(0.5,), std=(0.5,), channels=1)
    ds = ImageListDataset(paths, [i % 2 for i in range(6)], train_transform(pre, rotation=0, extra=augment), "L")
    folder = Recorder()
    fit(folder, DataLoader(ds, batch_size=3), cfg, num_classes=2, show=False)

    for seen in (tensors.seen, folder.seen):
        assert len(seen) == 3 if seen is tensors.seen else len(seen) == 2
        counts = min_pixels(seen)
        assert ((counts >= 9) if augment else (counts < 9)).all(), counts
        assert not (torch.cat(seen) == 0).any()  # no 0-filled box (mid-grey after normalisation)
    assert (torch.cat(folder.seen).amin(dim=(1, 2, 3)) < 0).all()  # the minimum, not 0, is what filled it


def test_cutmix_needs_num_classes_on_a_loader():
    with pytest.raises(ValueError, match="num_classes"):
        fit(small_cnn(), linear_loader(), TrainConfig(epochs=1, augment="cutmix"), show=False)


def test_old_call_forms_still_train():
    x, y = toy_set(16)
    a, b = small_cnn(), small_cnn()
    with pytest.warns(DeprecationWarning):
        old = fit(a, x, y, TrainConfig(epochs=1, batch_size=8), show=False)
    new = fit(b, (x, y), TrainConfig(epochs=1, batch_size=8), show=False)
    assert old == new and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.warns(DeprecationWarning):
        hist = fit_loader(small_cnn(), linear_loader(), TrainConfig(epochs=2), first_epoch=0, last_epoch=1,
                          total_epochs=2, show=False)
    assert len(hist) == 1
    with pytest.raises(TypeError):
        fit(small_cnn(), x, TrainConfig())
