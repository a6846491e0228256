"""The attribute captioner on drawn shapes whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from longtail.introspection.captioners import (
    ATTRIBUTES,
    PHRASES,
    AttributeCaptioner,
    AttributeThresholds,
    Captioner,
    compose_caption,
    describe,
    measure,
    measure_batch,
)

SIZE = 32


def canvas(size: int = SIZE) -> torch.Tensor:
    """Black image ``[size, size]`` in ``[0, 1]``."""
    return torch.zeros(size, size)


def box(top: int, left: int, height: int, width: int, value: float = 1.0, size: int = SIZE) -> torch.Tensor:
    img = canvas(size)
    img[top : top + height, left : left + width] = value
    return img


def bar(angle_deg: float, length: float = 24, thickness: float = 4) -> torch.Tensor:
    """Centred bar rotated clockwise from vertical by ``angle_deg`` (positive: the top leans right)."""
    c = (SIZE - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(SIZE) - c, torch.arange(SIZE) - c, indexing="ij")
    a = math.radians(angle_deg)
    along = xs * math.sin(a) - ys * math.cos(a)  # unit vector pointing to the bar's top end
    across = xs * math.cos(a) + ys * math.sin(a)
    return ((along.abs() <= length / 2) & (across.abs() <= thickness / 2)).float()


def phrases_of(img: torch.Tensor) -> list[str]:
    """All salient phrases of a [0, 1] image (no limit on their number)."""
    return describe(measure(img))


def to_model(img: torch.Tensor) -> torch.Tensor:
    """[H, W] in [0, 1] -> [1, 1, H, W] in [-1, 1]."""
    return (img * 2 - 1).view(1, 1, *img.shape)


# --------------------------------------------------------------------------------------------------------
# measurements


def test_measure_filled_rectangle() -> None:
    attrs = measure(box(8, 4, 16, 24))
    assert set(attrs) == set(ATTRIBUTES)
    assert attrs["area"] == pytest.approx(16 * 24 / SIZE**2)
    assert attrs["width"] == pytest.approx(24 / SIZE) and attrs["height"] == pytest.approx(16 / SIZE)
    assert attrs["aspect"] == pytest.approx(1.5)
    assert attrs["fill"] == pytest.approx(1.0) and attrs["hollowness"] == pytest.approx(0.0)
    assert attrs["offset_x"] == pytest.approx(0.0) and attrs["offset_y"] == pytest.approx(0.0)
    assert attrs["brightness"] == pytest.approx(1.0) and attrs["texture"] == pytest.approx(0.0)
    assert attrs["asymmetry"] == pytest.approx(0.0)
    assert abs(attrs["orientation"]) == pytest.approx(90.0)  # horizontal principal axis


@pytest.mark.parametrize("angle", [-30.0, -15.0, 20.0, 35.0])
def test_orientation_sign_convention(angle: float) -> None:
    attrs = measure(bar(angle))
    assert attrs["orientation"] == pytest.approx(angle, abs=3.0)
    assert attrs["tilt"] == pytest.approx(angle, abs=3.0)
    assert attrs["elongation"] > 3


def test_colour_channels_are_averaged() -> None:
    gray = box(10, 10, 8, 8, value=0.6)
    rgb = torch.stack([gray * 0.5, gray, gray * 1.5])
    assert measure(rgb) == pytest.approx(measure(gray))


def test_uint8_images_are_scaled() -> None:
    img = box(6, 6, 12, 12, value=0.6)
    assert measure((img * 255).round().to(torch.uint8)) == pytest.approx(measure(img), abs=2e-3)


def test_measure_batch_matches_measure() -> None:
    images = torch.stack([box(4, 4, 10, 20), bar(25.0), canvas()])
    batch = measure_batch(images)
    for i in range(3):
        single = measure(images[i])
        assert {k: float(v[i]) for k, v in batch.items()} == pytest.approx(single)


# --------------------------------------------------------------------------------------------------------
# phrases


def test_small_centred_square() -> None:
    found = phrases_of(box(13, 13, 6, 6))
    assert "small" in found and "large" not in found
    assert not any(p.startswith(("shifted", "tilted", "cut off")) for p in found)


def test_large_filled_rectangle() -> None:
    found = phrases_of(box(3, 3, 26, 26))
    assert "large" in found and "small" not in found and "hollow" not in found


def test_wide_and_tall_bars() -> None:
    wide, tall = phrases_of(box(13, 4, 6, 24)), phrases_of(box(4, 13, 24, 6))
    assert "wide" in wide and "tall" not in wide
    assert "tall" in tall and "wide" not in tall
    assert not any(p.startswith("tilted") for p in wide + tall)


def test_tilt_directions() -> None:
    right, left = phrases_of(bar(25.0)), phrases_of(bar(-25.0))
    assert "tilted right" in right and "tilted left" not in right
    assert "tilted left" in left and "tilted right" not in left


def test_round_object_has_no_tilt() -> None:
    c = (SIZE - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(SIZE) - c, torch.arange(SIZE) - c, indexing="ij")
    disc = ((xs**2 + ys**2) <= 8**2).float()
    assert not any(p.startswith("tilted") for p in phrases_of(disc))


def test_cut_off_at_left_edge() -> None:
    found = phrases_of(box(8, 0, 16, 8))
    assert "cut off at the left edge" in found
    assert not any(p in found for p in ("cut off at the right edge", "cut off at the top edge"))
    assert "cut off at the bottom edge" in phrases_of(box(20, 8, 12, 16))


def test_dark_and_bright() -> None:
    dim, lit = phrases_of(box(8, 8, 16, 16, value=0.3)), phrases_of(box(8, 8, 16, 16, value=1.0))
    assert "dark" in dim and "bright" not in dim
    assert "bright" in lit and "dark" not in lit


def test_hollow_outline_versus_filled_square() -> None:
    outline = box(6, 6, 20, 20)
    outline[8:24, 8:24] = 0
    assert "hollow" in phrases_of(outline)
    assert "hollow" not in phrases_of(box(6, 6, 20, 20))


def test_shifted_right_and_up() -> None:
    assert "shifted right" in phrases_of(box(12, 22, 8, 8))
    assert "shifted up" in phrases_of(box(2, 12, 8, 8))
    assert "shifted left" in phrases_of(box(12, 2, 8, 8))


def test_patterned_versus_plain() -> None:
    stripes = box(6, 6, 20, 20)
    stripes[6:26:2, 6:26] = 0.4
    assert "patterned" in phrases_of(stripes)
    assert "plain" in phrases_of(box(6, 6, 20, 20))


def test_asymmetric() -> None:
    shape = box(4, 8, 24, 4)
    shape[24:28, 8:24] = 1.0  # an L
    assert "asymmetric" in phrases_of(shape)
    assert "asymmetric" not in phrases_of(box(8, 8, 16, 16))


def test_blank_image() -> None:
    assert phrases_of(canvas()) == ["blank"]


def test_any_image_size() -> None:
    big = torch.zeros(96, 96)
    big[42:54, 42:54] = 1.0
    assert "small" in phrases_of(big)
    wide = torch.zeros(20, 64)
    wide[8:12, 4:60] = 1.0
    assert "wide" in phrases_of(wide)


def test_max_phrases_keeps_most_salient_in_fixed_order() -> None:
    attrs = measure(box(25, 0, 7, 7, value=0.25))  # small, dark, shifted left / down, cut off
    every = describe(attrs)
    two = describe(attrs, max_phrases=2)
    assert len(every) > 2 and len(two) == 2
    assert [p for p in every if p in two] == two  # same relative order
    assert describe(attrs, max_phrases=0) == []


def test_all_phrases_are_plain_words() -> None:
    assert len(set(PHRASES)) == len(PHRASES)
    assert all(p.replace(" ", "").replace("-", "").isalpha() for p in PHRASES)


def test_thresholds_are_configurable() -> None:
    attrs = measure(box(13, 13, 6, 6))
    assert "small" not in describe(attrs, AttributeThresholds(small_area=0.01))


# --------------------------------------------------------------------------------------------------------
# captions


def test_caption_prefix_and_article() -> None:
    captioner = AttributeCaptioner()
    images = torch.cat([to_model(box(13, 13, 6, 6)), to_model(box(13, 4, 6, 24))])
    sandal, boot = captioner.caption(images, ["sandal", "ankle boot"])
    assert sandal.startswith("a photo of a sandal")
    assert boot.startswith("a photo of an ankle boot, ")
    assert "small" in sandal.split(", ") and "wide" in boot.split(", ")
    assert compose_caption("bag", []) == "a photo of a bag"


def test_captioner_satisfies_protocol() -> None:
    captioner: Captioner = AttributeCaptioner()
    assert captioner.caption(to_model(box(4, 4, 8, 8)), ["coat"])[0].startswith("a photo of a coat")


def test_deterministic_and_batched() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 1, SIZE, SIZE, generator=g) * 2 - 1
    images[:, :, :, :8] = -1.0
    names = ["shirt"] * 7
    captioner = AttributeCaptioner(batch_size=3)
    threads = torch.get_num_threads()
    first = captioner.caption(images, names)
    assert torch.get_num_threads() == threads  # restored after measuring
    assert len(first) == 7 and first == captioner.caption(images.clone(), names)
    assert first == AttributeCaptioner().caption(images, names)  # chunking does not matter
    assert all(len(c.split(", ")) <= 1 + captioner.max_phrases for c in first)


def test_model_range_and_rgb_inputs() -> None:
    img = box(5, 9, 22, 10, value=0.8)
    expected = compose_caption("dress", describe(measure(img), max_phrases=4))
    gray = to_model(img)
    assert AttributeCaptioner().caption(gray, ["dress"]) == [expected]
    assert AttributeCaptioner().caption(gray.expand(1, 3, SIZE, SIZE), ["dress"]) == [expected]


def test_class_name_count_must_match() -> None:
    with pytest.raises(ValueError, match="2 images but 1 class names"):
        AttributeCaptioner().caption(torch.zeros(2, 1, 8, 8), ["bag"])


# --------------------------------------------------------------------------------------------------------
# whole-image phrases: "inverted" (bright background) and "faint" (no bright pixel)


def test_border_and_peak_attributes() -> None:
    attrs = measure(box(8, 8, 16, 16, value=0.6))
    assert attrs["border"] == pytest.approx(0.0) and attrs["peak"] == pytest.approx(0.6)
    inverted = 1.0 - box(8, 8, 16, 16, value=0.6)
    assert measure(inverted)["border"] == pytest.approx(1.0)


def test_inverted_fires_on_a_bright_background_and_is_kept_first() -> None:
    inverted = 1.0 - box(6, 9, 20, 14, value=0.8)
    every = phrases_of(inverted)
    assert "inverted" in every and len(every) > 4
    assert AttributeCaptioner().phrases(to_model(inverted))[0][0] == "inverted"
    assert describe(measure(inverted), max_phrases=1) == ["inverted"]
    assert "inverted" not in phrases_of(box(6, 9, 20, 14, value=0.8))
    assert "inverted" not in phrases_of(box(0, 0, 32, 3))  # a garment along one border is not a background


def test_faint_fires_when_no_pixel_is_bright() -> None:
    faint = box(6, 9, 20, 14, value=0.25)
    assert {"faint", "dark"} <= set(phrases_of(faint))
    assert "faint" in describe(measure(faint), max_phrases=1)
    assert "faint" not in phrases_of(box(6, 9, 20, 14, value=0.45))
    assert phrases_of(canvas()) == ["blank"]  # an empty image stays blank, not faint
