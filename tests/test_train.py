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
from longtail.train import (
    TrainConfig,
    base_loss,
    cosine_schedule,
    fit,
    fit_loader,
    logit_offsets,
    predict,
    tensor_loader,
)


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


# --- long-tail losses: logit adjustment (Menon et al. 2021) and Balanced Softmax (Ren et al. 2020) ----------

EYE_LOGITS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
EYE_LABELS = torch.tensor([0, 1])


def test_logit_adjusted_loss_matches_its_closed_form():
    # counts [3, 1]: prior [.75, .25]. Row 0 (y=0): -log softmax(l + tau log p)_0 = log(1 + (1/3)^tau e^-1);
    # row 1 (y=1): log(1 + 3^tau e^-1).
    e = math.exp(-1)
    for tau, want in [(1.0, (math.log(1 + e / 3) + math.log(1 + 3 * e)) / 2),
                      (2.0, (math.log(1 + e / 9) + math.log(1 + 9 * e)) / 2),
                      (0.0, math.log(1 + e))]:
        got = base_loss(EYE_LOGITS, EYE_LABELS, logit_offsets("logit_adjusted", [3, 1], tau)).mean()
        assert float(got) == pytest.approx(want, rel=1e-6), tau
    by_hand = (0.11567 + 0.74367) / 2  # log(1.12263), log(2.10364)
    assert (math.log(1 + e / 3) + math.log(1 + 3 * e)) / 2 == pytest.approx(by_hand, abs=1e-5)
    ce = base_loss(EYE_LOGITS, EYE_LABELS, logit_offsets("ce", [3, 1]))
    assert torch.allclose(ce, torch.full((2,), math.log(1 + e)))


def test_fit_trains_on_the_configured_loss():
    # lr 0: the model stays put, so the one epoch's mean loss is the loss of the fixed logits [[1, 0], [0, 1]]
    def first_loss(loss: str, counts=None) -> float:
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(torch.eye(2))
            model.bias.zero_()
        loader = DataLoader(TensorDataset(EYE_LOGITS, EYE_LABELS), batch_size=2)
        cfg = TrainConfig(epochs=1, lr=0.0, loss=loss)
        return fit(model, loader, cfg, class_counts=counts, show=False)[0]

    e = math.exp(-1)
    assert first_loss("ce") == pytest.approx(math.log(1 + e), rel=1e-6)
    assert first_loss("ce", [3, 1]) == pytest.approx(math.log(1 + e), rel=1e-6)  # CE ignores the counts
    la = (math.log(1 + e / 3) + math.log(1 + 3 * e)) / 2
    assert first_loss("logit_adjusted", [3, 1]) == pytest.approx(la, rel=1e-6)
    assert first_loss("balanced_softmax", torch.tensor([30, 10])) == pytest.approx(la, rel=1e-6)


def test_balanced_softmax_is_logit_adjustment_at_tau_one_and_ce_for_equal_counts():
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 4, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    counts = [50, 20, 5, 1]
    bs = logit_offsets("balanced_softmax", counts)
    assert not torch.allclose(bs, logit_offsets("logit_adjusted", counts, 1.0))  # stated separately: log n_c
    la = logit_offsets("logit_adjusted", counts)
    assert torch.allclose(base_loss(logits, y, bs), base_loss(logits, y, la), atol=1e-6)
    assert not torch.allclose(base_loss(logits, y, bs), base_loss(logits, y), atol=1e-3)
    equal = logit_offsets("balanced_softmax", [7, 7, 7, 7])
    assert torch.allclose(base_loss(logits, y, equal), base_loss(logits, y), atol=1e-6)
    equal_la = logit_offsets("logit_adjusted", [7, 7, 7, 7])
    assert torch.allclose(base_loss(logits, y, equal_la), base_loss(logits, y), atol=1e-6)


def test_logit_adjusted_gradient_is_adjusted_softmax_minus_onehot():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=gen, requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    counts, tau = torch.tensor([10.0, 3.0, 1.0]), 0.5
    base_loss(logits, y, logit_offsets("logit_adjusted", counts, tau)).sum().backward()
    prior = counts / counts.sum()
    onehot = torch.nn.functional.one_hot(y, 3)
    want = torch.softmax(logits.detach() + tau * prior.log(), -1) - onehot
    assert torch.allclose(logits.grad, want, atol=1e-6)
    assert not torch.allclose(logits.grad, torch.softmax(logits.detach(), -1) - onehot, atol=1e-3)


def test_soft_targets_take_the_same_offsets():
    # CutMix hands the loss class probabilities [B, C]; the offsets apply the same way
    offsets = logit_offsets("logit_adjusted", [3, 1])
    onehot = torch.nn.functional.one_hot(EYE_LABELS, 2).float()
    assert torch.allclose(base_loss(EYE_LOGITS, onehot, offsets), base_loss(EYE_LOGITS, EYE_LABELS, offsets))


def test_loss_settings_are_validated():
    allowed = r"TrainConfig\.loss must be one of 'ce', 'logit_adjusted', 'balanced_softmax'; got 'focal'"
    with pytest.raises(ValueError, match=allowed):
        TrainConfig(loss="focal")
    with pytest.raises(ValueError, match=r"TrainConfig\.tau"):
        TrainConfig(loss="logit_adjusted", tau=-0.5)
    assert TrainConfig(loss="logit_adjusted", tau=0.0).tau == 0.0
    for loss in ("logit_adjusted", "balanced_softmax"):  # a class without examples: a finite, very low offset
        empty = logit_offsets(loss, [4, 0])
        assert torch.isfinite(empty).all() and float(empty[1] - empty[0]) == pytest.approx(math.log(1e-12))
    for loss in ("logit_adjusted", "balanced_softmax"):
        with pytest.raises(ValueError, match=f"'{loss}' needs the training data's class counts"):
            fit(small_cnn(), linear_loader(), TrainConfig(epochs=1, loss=loss), show=False)
    cfg = TrainConfig(epochs=1, loss="logit_adjusted")
    with pytest.raises(ValueError, match="num_classes is 2"):
        fit(small_cnn(), linear_loader(), cfg, class_counts=[3, 2, 1], num_classes=2, show=False)
    with pytest.raises(ValueError, match="classifier has 2 logits"):
        fit(small_cnn(), linear_loader(), cfg, class_counts=[3, 2, 1], show=False)
    with pytest.raises(ValueError, match="non-negative"):
        fit(small_cnn(), linear_loader(), cfg, class_counts=[3, -1], show=False)
    cfg.loss = "focal"  # set after construction: fit checks again
    with pytest.raises(ValueError, match=r"TrainConfig\.loss"):
        fit(small_cnn(), linear_loader(), cfg, class_counts=[3, 1], show=False)


def test_the_oracle_loss_is_the_same_under_logit_adjustment():
    # One step: the heads see the same detached features in both runs, so they take the same step; the base
    # (trained by the base loss) does not.
    x, y = toy_set(8)
    x, y = x[:6], torch.tensor([0, 0, 0, 0, 0, 1])

    def one_step(loss: str) -> EpistemicClassifier:
        model = EpistemicClassifier(small_cnn(), num_heads=3, head_name="5", seed=0)
        fit(model, DataLoader(TensorDataset(x, y), batch_size=6), TrainConfig(epochs=1, loss=loss),
            class_counts=[5, 1], show=False)
        return model

    ce, la = one_step("ce"), one_step("logit_adjusted")
    assert torch.equal(ce.heads.weight, la.heads.weight)
    assert not torch.equal(ce.base[-1].weight, la.base[-1].weight)


def long_tailed_blobs(counts: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping 2-D Gaussians (class 0 at (-0.5, 0), class 1 at (+0.5, 0), unit variance)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randn(len(y), 2, generator=gen) + torch.stack([y.float() - 0.5, torch.zeros(len(y))], 1)
    return x, y


def test_logit_adjustment_raises_minority_recall_on_a_toy_long_tail():
    x, y = long_tailed_blobs((190, 10), seed=0)
    test_x, test_y = long_tailed_blobs((500, 500), seed=1)

    def minority_recall(loss: str) -> float:
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        cfg = TrainConfig(epochs=30, lr=0.05, weight_decay=0.0, loss=loss)
        fit(model, loader, cfg, class_counts=[190, 10], show=False)
        pred = predict(model, test_x).logits.argmax(-1)
        return float((pred[test_y == 1] == 1).float().mean())

    ce, la = minority_recall("ce"), minority_recall("logit_adjusted")
    assert ce < 0.2 and la > 0.5, (ce, la)
