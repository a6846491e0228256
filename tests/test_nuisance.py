"""Nuisance modes on drawn shapes whose answers are known, mode assignment, test splits and captions."""

from __future__ import annotations

import math

import pytest
import torch

from longtail.data import nuisance as nz
from longtail.data.datasets import (
    DataError,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
    to_model_range,
)
from longtail.data.nuisance import (
    BACKGROUND,
    CLEAN,
    DEFAULT_RATES,
    MODE_NAMES,
    MODES,
    apply_mode,
    assign_modes,
    mode_id,
    mode_phrase,
    nuisance_test_split,
    split_mode_ids,
    with_modes,
)
from longtail.introspection.captioners import AttributeCaptioner
from longtail.models.tiny import caption_variants, training_captions, with_mode_phrase

SIZE = 32


def garment(top: int = 4, left: int = 9, height: int = 24, width: int = 14, value: float = 0.6) -> torch.Tensor:
    """A model-range ``[1, 1, 32, 32]`` image: a filled upright rectangle on the black background."""
    img = torch.full((1, 1, SIZE, SIZE), BACKGROUND)
    img[..., top : top + height, left : left + width] = value
    return img


def shapes() -> torch.Tensor:
    """A batch of 6 garment-like images in [-1, 1]: rectangles, a T-shirt, a textured one, a shoe, noise."""
    tee = garment(10, 6, 18, 20)
    tee[..., 4:10, 11:21] = 0.8  # neck / shoulders
    textured = garment(3, 8, 26, 16)
    textured[..., 3:29:2, 8:24] = 0.1
    shoe = garment(16, 3, 10, 26, value=0.3)
    noise = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return torch.cat([garment(), garment(6, 4, 20, 24, value=1.0), tee, textured, shoe, noise])


def mass(x: torch.Tensor) -> torch.Tensor:
    """Garment mass per image ``[N]``: sum of ``x - BACKGROUND`` over pixels brighter than the foreground."""
    return ((x - BACKGROUND) * (x > nz.FOREGROUND)).flatten(1).sum(1)


def centroid(x: torch.Tensor) -> tuple[float, float]:
    """(row, col) centroid of ``x - BACKGROUND`` of one image ``[1, 1, H, W]``."""
    w = (x - BACKGROUND)[0, 0]
    rows, cols = torch.arange(w.shape[0]).float(), torch.arange(w.shape[1]).float()
    return float((w.sum(1) * rows).sum() / w.sum()), float((w.sum(0) * cols).sum() / w.sum())


# --------------------------------------------------------------------------------------------------------
# every mode


@pytest.mark.parametrize("name", MODE_NAMES)
def test_mode_is_deterministic_and_keeps_shape_and_range(name: str) -> None:
    x = shapes()
    first = apply_mode(name, x, 5)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert float(first.min()) >= -1.0 and float(first.max()) <= 1.0
    assert torch.equal(first, apply_mode(name, x.clone(), torch.Generator().manual_seed(5)))
    assert not torch.equal(first, x)
    other = apply_mode(name, x, 6)
    if MODES[name].random:
        assert not torch.equal(first, other)
    else:
        assert torch.equal(first, other)
    rgb = apply_mode(name, x.expand(-1, 3, -1, -1).contiguous(), 5)
    assert rgb.shape == (6, 3, SIZE, SIZE) and torch.allclose(rgb[:, :1], first, atol=1e-6)


def test_registry_and_phrases() -> None:
    assert MODE_NAMES[:6] == ("rotate", "corner", "occlude", "cutoff", "invert", "low_contrast")
    assert set(DEFAULT_RATES) == set(MODE_NAMES) and all(r == 0.03 for r in DEFAULT_RATES.values())
    phrases = [mode_phrase(n) for n in MODE_NAMES]
    assert len(set(phrases)) == len(phrases)
    assert mode_phrase("rotate") == "rotated" and mode_phrase(mode_id("corner")) == "small in a corner"
    assert mode_phrase("invert") == "inverted" and mode_phrase("low_contrast") == "faint"
    with pytest.raises(KeyError, match="unknown nuisance mode 'swirl'"):
        apply_mode("swirl", shapes(), 0)
    with pytest.raises(KeyError):
        mode_phrase(len(MODE_NAMES))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        apply_mode("invert", torch.zeros(SIZE, SIZE), 0)
    with pytest.raises(TypeError):
        apply_mode("rotate", shapes(), 0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# known outputs


def test_invert_and_low_contrast() -> None:
    x = shapes()
    assert torch.equal(apply_mode("invert", x, 0), -x)
    low = apply_mode("low_contrast", x, 0)
    assert torch.allclose(low - BACKGROUND, nz.LOW_CONTRAST * (x - BACKGROUND), atol=1e-6)
    assert torch.equal(low[0, 0, 0], x[0, 0, 0])  # the background stays where it was


def test_upside_down_moves_a_marked_pixel_to_the_opposite_side() -> None:
    x = garment()
    x[0, 0, 5, 10] = 1.0
    out = apply_mode("upside_down", x, 0)
    assert out[0, 0, SIZE - 1 - 5, SIZE - 1 - 10] == 1.0
    assert torch.equal(apply_mode("upside_down", out, 0), x)


def test_rotate_by_a_quarter_turn_moves_pixels_exactly() -> None:
    x = torch.full((1, 1, SIZE, SIZE), BACKGROUND)
    x[0, 0, 3, 20] = 1.0  # (x, y) = (4.5, -12.5) from the centre; clockwise by 90 -> (12.5, 4.5)
    out = nz.render_rotate(x, {"angle": torch.tensor([90.0])})
    assert out[0, 0, 20, 28] == pytest.approx(1.0, abs=1e-4)
    assert float((out + 1).sum()) == pytest.approx(2.0, abs=1e-4)


def test_rotate_moves_a_marked_block_by_the_drawn_angle() -> None:
    x = torch.full((1, 1, SIZE, SIZE), BACKGROUND)
    x[0, 0, 5:8, 14:17] = 1.0  # centred on row 6, col 15
    gen_seed = 11
    angle = float(nz.draw_rotate(1, torch.Generator().manual_seed(gen_seed))["angle"][0])
    assert 60.0 <= abs(angle) <= 120.0
    out = apply_mode("rotate", x, gen_seed)
    a = math.radians(angle)
    px, py = 15 - 15.5, 6 - 15.5
    expected = (15.5 + px * math.sin(a) + py * math.cos(a), 15.5 + px * math.cos(a) - py * math.sin(a))
    assert centroid(out) == pytest.approx(expected, abs=0.3)


def test_rotate_sign_is_the_captioners_clockwise() -> None:
    tall = garment(4, 13, 24, 6)
    assert "tilted right" in AttributeCaptioner(max_phrases=99).phrases(
        nz.render_rotate(tall, {"angle": torch.tensor([20.0])}))[0]
    assert "tilted left" in AttributeCaptioner(max_phrases=99).phrases(
        nz.render_rotate(tall, {"angle": torch.tensor([-20.0])}))[0]


def test_rotate_angles_are_large_and_both_ways() -> None:
    angles = nz.draw_rotate(400, torch.Generator().manual_seed(0))["angle"]
    assert bool(((angles.abs() >= 60) & (angles.abs() <= 120)).all())
    assert 150 < int((angles > 0).sum()) < 250


@pytest.mark.parametrize("corner", [0, 1, 2, 3])
def test_corner_puts_the_shape_into_one_quadrant(corner: int) -> None:
    x = shapes()[:5]
    n = len(x)
    params = {"scale": torch.full((n,), 0.5, dtype=torch.float64), "corner": torch.full((n,), corner)}
    out = nz.render_corner(x, params)
    w = out - BACKGROUND
    rows = slice(16, 32) if corner >= 2 else slice(0, 16)
    cols = slice(16, 32) if corner % 2 else slice(0, 16)
    inside = w[:, :, rows, cols].flatten(1).sum(1)
    assert torch.allclose(inside, w.flatten(1).sum(1))  # all of it
    # at scale 1/2 each output pixel is the mean of a 2x2 input block: a quarter of the mass
    assert torch.allclose(w.flatten(1).sum(1), (x - BACKGROUND).flatten(1).sum(1) / 4, rtol=1e-5)
    assert torch.allclose(out[:, :, rows, cols], torch.nn.functional.avg_pool2d(x, 2), atol=1e-5)


def test_corner_scales_are_about_half() -> None:
    params = nz.draw_corner(200, torch.Generator().manual_seed(0))
    assert bool(((params["scale"] >= 0.45) & (params["scale"] <= 0.55)).all())
    assert set(params["corner"].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("border", [0, 1, 2, 3])
def test_cutoff_pushes_the_drawn_fraction_out_of_the_frame(border: int) -> None:
    x = shapes()[:5]
    n = len(x)
    fraction = torch.tensor([0.30, 0.35, 0.40, 0.45, 0.33], dtype=torch.float64)
    params = {"fraction": fraction, "border": torch.full((n,), border)}
    out = nz.render_cutoff(x, params)
    left = 1 - mass(out) / mass(x)
    # out of frame: at least the fraction, and less than the fraction plus one column (row) of the garment
    profile = ((x - BACKGROUND) * (x > nz.FOREGROUND))[:, 0].sum(1 if border <= 1 else 2)
    step = profile.amax(1) / mass(x)
    assert bool((left >= fraction.float() - 1e-6).all()) and bool((left < fraction.float() + step).all())
    edge = {0: out[..., :, 0], 1: out[..., :, -1], 2: out[..., 0, :], 3: out[..., -1, :]}[border]
    assert bool((edge > nz.FOREGROUND).flatten(1).any(1).all())  # the garment now reaches that border
    shift = nz.cutoff_shift(x, params)
    assert bool((shift >= 1).all())
    for i, d in enumerate(shift.tolist()):  # pixels move exactly (no interpolation); background comes in
        moved = {0: (out[i, 0, :, : SIZE - d], x[i, 0, :, d:]), 1: (out[i, 0, :, d:], x[i, 0, :, : SIZE - d]),
                 2: (out[i, 0, : SIZE - d], x[i, 0, d:]), 3: (out[i, 0, d:], x[i, 0, : SIZE - d])}[border]
        assert torch.equal(*moved)
        entered = {0: out[i, 0, :, SIZE - d :], 1: out[i, 0, :, :d], 2: out[i, 0, SIZE - d :], 3: out[i, 0, :d]}
        assert bool((entered[border] == BACKGROUND).all())


def test_occlude_paints_a_bar_over_the_drawn_fraction() -> None:
    x = shapes()[:5]
    n = len(x)
    for vertical in (False, True):
        for bright in (False, True):
            params = {
                "fraction": torch.tensor([0.25, 0.30, 0.35, 0.28, 0.32], dtype=torch.float64),
                "vertical": torch.full((n,), vertical),
                "bright": torch.full((n,), bright),
                "position": torch.tensor([0.0, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64),
            }
            bar = nz.occluder_mask(x, params)
            out = nz.render_occlude(x, params)
            value = 1.0 if bright else -1.0
            assert bool((out[:, 0][bar] == value).all())
            assert torch.equal(out[:, 0][~bar], x[:, 0][~bar])
            fg = x[:, 0] > nz.FOREGROUND
            covered = (bar & fg).flatten(1).sum(1) / fg.flatten(1).sum(1)
            per_line = fg.sum(2 if not vertical else 1).amax(1) / fg.flatten(1).sum(1)
            assert bool((covered >= params["fraction"].float() - 1e-6).all())
            assert bool((covered < params["fraction"].float() + per_line).all())
            for b in bar:  # a solid rectangle
                rows, cols = b.any(1).nonzero().squeeze(1), b.any(0).nonzero().squeeze(1)
                assert int(b.sum()) == rows.numel() * cols.numel()
                assert rows.numel() == int(rows[-1] - rows[0] + 1) and cols.numel() == int(cols[-1] - cols[0] + 1)


def test_blur_keeps_the_mass_and_spreads_a_point_by_sigma() -> None:
    x = torch.full((1, 1, SIZE, SIZE), BACKGROUND)
    x[0, 0, 15, 16] = 1.0
    out = apply_mode("blur", x, 0)
    w = out - BACKGROUND
    assert float(w.sum()) == pytest.approx(2.0, rel=1e-5)
    rows = torch.arange(SIZE).float()
    variance = float((w[0, 0].sum(1) * (rows - 15) ** 2).sum() / w.sum())
    assert variance == pytest.approx(nz.BLUR_SIGMA**2, rel=0.02)


# --------------------------------------------------------------------------------------------------------
# assigning modes


def test_assign_modes_gives_exact_counts() -> None:
    labels = torch.arange(1000) % 10
    rates = {"rotate": 0.03, "invert": 0.05, "cutoff": 0.0155}
    ids = assign_modes(labels, rates, seed=1)
    assert ids.shape == (1000,) and ids.dtype == torch.long
    for name, rate in rates.items():
        assert int((ids == mode_id(name)).sum()) == round(rate * 1000)
    assert int((ids == CLEAN).sum()) == 1000 - 30 - 50 - 16
    assert torch.equal(ids, assign_modes(labels, rates, seed=1))
    assert not torch.equal(ids, assign_modes(labels, rates, seed=2))
    default = assign_modes(labels, DEFAULT_RATES, 0)
    assert all(int((default == i).sum()) == 30 for i in range(len(MODE_NAMES)))


def test_assign_modes_is_class_blind_and_a_longtail_subset_inherits_the_rates() -> None:
    labels = torch.arange(60000) % 10
    shuffled = labels[torch.randperm(60000, generator=torch.Generator().manual_seed(9))]
    ids = assign_modes(labels, DEFAULT_RATES, seed=0)
    assert torch.equal(ids, assign_modes(shuffled, DEFAULT_RATES, seed=0))  # labels play no part
    for c in range(10):
        per_class = ids[labels == c]
        for m in range(len(MODE_NAMES)):
            assert abs(float((per_class == m).float().mean()) - 0.03) < 0.01
    subset = longtail_indices(labels, longtail_counts(), seed=0)
    assert abs(float((ids[subset] >= 0).float().mean()) - 0.24) < 0.03


def test_assign_modes_rejects_bad_rates() -> None:
    labels = torch.zeros(100, dtype=torch.long)
    with pytest.raises(KeyError, match="unknown nuisance mode"):
        assign_modes(labels, {"swirl": 0.1}, 0)
    with pytest.raises(ValueError, match=">= 0"):
        assign_modes(labels, {"rotate": -0.1}, 0)
    with pytest.raises(ValueError, match="less than 1"):
        assign_modes(labels, {"rotate": 0.6, "invert": 0.4}, 0)


def test_with_modes_applies_each_images_mode() -> None:
    x = shapes()
    ids = torch.tensor([CLEAN, mode_id("invert"), mode_id("rotate"), CLEAN, mode_id("low_contrast"), 0])
    out = with_modes(x, ids, seed=3)
    assert torch.equal(out[[0, 3]], x[[0, 3]])
    assert torch.equal(out[1], -x[1])
    assert torch.allclose(out[4] - BACKGROUND, nz.LOW_CONTRAST * (x[4] - BACKGROUND))
    assert not torch.equal(out[2], x[2]) and not torch.equal(out[5], x[5])
    assert torch.equal(out, with_modes(x, ids, seed=3))
    assert not torch.equal(out[[2, 5]], with_modes(x, ids, seed=4)[[2, 5]])
    with pytest.raises(ValueError, match="6 images but 5 mode ids"):
        with_modes(x, ids[:5], 0)
    with pytest.raises(ValueError, match="mode ids must lie in"):
        with_modes(x, torch.full((6,), len(MODE_NAMES)), 0)


# --------------------------------------------------------------------------------------------------------
# test splits


def test_split_mode_ids() -> None:
    assert torch.equal(split_mode_ids(5, "corner", 0), torch.full((5,), mode_id("corner")))
    ids = split_mode_ids(10000, "all", 0)
    counts = torch.bincount(ids, minlength=len(MODE_NAMES))
    assert int(counts.min()) == int(counts.max()) == 10000 // len(MODE_NAMES)
    assert not torch.equal(ids, split_mode_ids(10000, "all", 1))
    with pytest.raises(KeyError):
        split_mode_ids(5, "swirl", 0)


def _fashion_test() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        raw, labels = load_fashion_mnist("test")
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    return to_model_range(raw), labels


def test_nuisance_test_split_has_the_documented_size_and_changes_every_image() -> None:
    images, labels = _fashion_test()
    out, out_labels = nuisance_test_split(images, labels, "all", seed=0)
    assert out.shape == (10000, 1, 32, 32) and torch.equal(out_labels, labels)
    assert bool((out != images).flatten(1).any(1).all())
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    for name in MODE_NAMES:
        part, part_labels = nuisance_test_split(images[:1000], labels[:1000], name, seed=0)
        assert part.shape == (1000, 1, 32, 32) and torch.equal(part_labels, labels[:1000])
        assert bool((part != images[:1000]).flatten(1).any(1).all()), name
    with pytest.raises(ValueError, match="labels"):
        nuisance_test_split(images[:3], labels[:2], "invert", 0)


# --------------------------------------------------------------------------------------------------------
# captions


# What the attribute captioner says about each mode on the drawn garment (a 24x14 rectangle, value 0.6 in
# [-1, 1], i.e. 0.8 on [0, 1]), with the mode's parameters fixed. On the clean garment none of these fire.
CAPTIONER_NAMES: dict[str, tuple[dict[str, torch.Tensor], set[str]]] = {
    "rotate": ({"angle": torch.tensor([70.0], dtype=torch.float64)}, {"tilted left"}),  # 70 - 90 = -20
    "corner": ({"scale": torch.tensor([0.5], dtype=torch.float64), "corner": torch.tensor([3])},
               {"small", "shifted right", "shifted down"}),
    "occlude": ({"fraction": torch.tensor([0.3], dtype=torch.float64), "vertical": torch.tensor([False]),
                 "bright": torch.tensor([False]), "position": torch.tensor([0.5], dtype=torch.float64)},
                set()),
    "cutoff": ({"fraction": torch.tensor([0.4], dtype=torch.float64), "border": torch.tensor([0])},
               {"cut off at the left edge", "shifted left"}),
    "invert": ({}, {"inverted"}),
    "low_contrast": ({}, {"faint", "dark"}),
    "blur": ({}, set()),
    "upside_down": ({}, set()),
}


@pytest.mark.parametrize("name", MODE_NAMES)
def test_what_the_attribute_captioner_names(name: str) -> None:
    params, named = CAPTIONER_NAMES[name]
    clean = garment()
    captioner = AttributeCaptioner()  # at most 4 phrases, as in training
    before = set(captioner.phrases(clean)[0])
    after = set(captioner.phrases(MODES[name].render(clean, params))[0])
    assert named <= after, (name, after)
    assert not named & before
    if not named:  # the captioner has no word for this mode
        assert not {mode_phrase(name)} & after


def test_captioner_inverted_and_faint_never_fire_on_clean_shapes() -> None:
    found = {p for ps in AttributeCaptioner(max_phrases=99).phrases(shapes()[:5]) for p in ps}
    assert "inverted" not in found and "faint" not in found
    inverted = AttributeCaptioner().phrases(apply_mode("invert", shapes()[:5], 0))
    assert all(ps[0] == "inverted" for ps in inverted)  # kept first, whatever else fires


def test_captions_mention_the_mode() -> None:
    assert with_mode_phrase("a photo of a coat, dark", mode_id("rotate")) == "a photo of a coat, rotated, dark"
    assert with_mode_phrase("a photo of a bag", mode_id("cutoff")) == "a photo of a bag, partly out of frame"
    assert with_mode_phrase("a photo of a bag, small", CLEAN) == "a photo of a bag, small"
    assert caption_variants(with_mode_phrase("a photo of a coat, dark", mode_id("corner")))[1] == (
        "a photo of a coat that is small in a corner and dark")
    x = shapes()[:3]
    modes = torch.tensor([CLEAN, mode_id("invert"), mode_id("rotate")])
    captions = training_captions(with_modes(x, modes, 0), ["coat", "bag", "ankle boot"], modes)
    assert captions[0] == AttributeCaptioner().caption(x[:1], ["coat"])[0]
    assert captions[1].startswith("a photo of a bag, inverted") and captions[1].count("inverted") == 1
    assert captions[2].startswith("a photo of an ankle boot, rotated")
    with pytest.raises(ValueError, match="3 images but 2 mode ids"):
        training_captions(x, ["coat"] * 3, modes[:2])
