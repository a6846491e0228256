"""Captioners: say in words what an image shows.

A :class:`Captioner` stands in for the vision-language model of the paper (METHOD.md section 5). The
embedded :class:`AttributeCaptioner` measures simple geometric and photometric attributes of the object
(size, shape, tilt, position, brightness, holes, texture, cut-off edges, symmetry, plus two whole-image
checks: a bright background and a faint image) and turns the salient ones into plain English phrases: ``"a photo of a sandal, small, hollow, patterned"``. It is deterministic
and fast, so it can caption a whole training set (to text-condition a small diffusion model) and the
guided / unguided images compared by Longtail Introspection.

Conventions. Image coordinates: x grows to the right, y grows downwards. Offsets are fractions of the
image size, positive = right / down. Angles are in degrees and positive = clockwise on screen, i.e. the
top of an upright object leans to the right ("tilted right").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

FG_LEVEL = 0.1  # a pixel in [0, 1] belongs to the object when brighter than this
EDGE_BAND = 0.1  # width of the band along each border, as a fraction of the image size
EDGES: tuple[str, ...] = ("left", "right", "top", "bottom")
ATTRIBUTES: tuple[str, ...] = (
    "area",
    "width",
    "height",
    "aspect",
    "offset_x",
    "offset_y",
    "orientation",
    "tilt",
    "elongation",
    "brightness",
    "fill",
    "hollowness",
    "contrast",
    "texture",
    "edge_left",
    "edge_right",
    "edge_top",
    "edge_bottom",
    "asymmetry",
    "border",
    "peak",
)


class Captioner(Protocol):
    """Anything that captions a batch of images given the class each image is meant to show."""

    def caption(self, images: Tensor, class_names: Sequence[str]) -> list[str]:
        """``images`` ``[B, 1 or 3, H, W]`` in ``[-1, 1]``, ``class_names`` of length B -> B captions."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Measuring


def _first_true(flags: Tensor) -> Tensor:
    """Index of the first True along the last dim of a bool ``[B, N]`` (0 when there is none) -> ``[B]``."""
    return flags.float().argmax(dim=-1)


def _spans(mask: Tensor, dim: int) -> Tensor:
    """Pixels lying between the first and last foreground pixel of their row (dim=-1) or column (dim=-2)."""
    m = mask.float()
    return (m.cumsum(dim) > 0) & (m.flip(dim).cumsum(dim).flip(dim) > 0)


def measure_batch(
    images: Tensor, fg_level: float = FG_LEVEL, edge_band: float = EDGE_BAND
) -> dict[str, Tensor]:
    """Attributes of each image of a batch: ``[B, H, W]`` float in ``[0, 1]`` (or uint8) -> ``{name: [B]}``.

    The object is the set of pixels brighter than ``fg_level``. See :func:`measure` for what each
    attribute means. An image without foreground gets all attributes 0 (``area`` 0 marks it blank).
    """
    if images.dim() != 3:
        raise ValueError(f"expected images [B, H, W], got shape {tuple(images.shape)}")
    x = images.detach().float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = x.clamp(0.0, 1.0)
    b, h, w = x.shape
    mask = x > fg_level
    m = mask.float()
    count = m.sum(dim=(1, 2))
    has = count > 0
    safe_count = count.clamp_min(1.0)

    # bounding box (inclusive pixel indices)
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    top, left = _first_true(rows), _first_true(cols)
    bottom, right = h - 1 - _first_true(rows.flip(1)), w - 1 - _first_true(cols.flip(1))
    box_w = torch.where(has, (right - left + 1).float(), torch.zeros(()))
    box_h = torch.where(has, (bottom - top + 1).float(), torch.zeros(()))

    # intensity-weighted centroid and second central moments
    wt = x * m
    mass = wt.sum(dim=(1, 2)).clamp_min(1e-8)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    cx = (wt.sum(dim=1) * xs).sum(dim=1) / mass
    cy = (wt.sum(dim=2) * ys).sum(dim=1) / mass
    dx = xs.view(1, 1, w) - cx.view(b, 1, 1)
    dy = ys.view(1, h, 1) - cy.view(b, 1, 1)
    mu20 = (wt * dx * dx).sum(dim=(1, 2)) / mass
    mu02 = (wt * dy * dy).sum(dim=(1, 2)) / mass
    mu11 = (wt * dx * dy).sum(dim=(1, 2)) / mass
    # principal axis angle from the x axis (y down, so positive = clockwise on screen), in [-90, 90]
    phi = torch.rad2deg(0.5 * torch.atan2(2.0 * mu11, mu20 - mu02))
    orientation = torch.where(phi <= 0, phi + 90.0, phi - 90.0)  # from vertical, (-90, 90]
    tilt = 45.0 - torch.remainder(45.0 - phi, 90.0)  # from the nearest of vertical / horizontal, (-45, 45]
    half_sum, half_diff = (mu20 + mu02) / 2, torch.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    elongation = torch.sqrt((half_sum + half_diff) / (half_sum - half_diff).clamp_min(1e-2))

    # photometry of the foreground
    brightness = mass / safe_count
    contrast = torch.sqrt((m * (x - brightness.view(b, 1, 1)) ** 2).sum(dim=(1, 2)) / safe_count)
    # forward differences (they also see one-pixel stripes) at pixels whose 3x3 neighbourhood is all object
    grad_x = F.pad((x[:, :, 1:] - x[:, :, :-1]).abs(), (0, 1))
    grad_y = F.pad((x[:, 1:, :] - x[:, :-1, :]).abs(), (0, 0, 0, 1))
    interior = -F.max_pool2d(-m.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)  # eroded mask
    texture = ((grad_x + grad_y) * interior).sum(dim=(1, 2)) / (2.0 * interior.sum(dim=(1, 2)).clamp_min(1.0))

    # shape: fill of the bounding box and holes (background enclosed by the object's row / column spans)
    fill = count / (box_w * box_h).clamp_min(1.0)
    hull = (_spans(mask, -1) & _spans(mask, -2)).float().sum(dim=(1, 2))
    hollowness = 1.0 - count / hull.clamp_min(1.0)

    # how much of the band along each border is covered by the object
    band_w, band_h = max(1, math.ceil(edge_band * w)), max(1, math.ceil(edge_band * h))
    edge_left = m[:, :, :band_w].mean(dim=(1, 2))
    edge_right = m[:, :, w - band_w :].mean(dim=(1, 2))
    edge_top = m[:, :band_h, :].mean(dim=(1, 2))
    edge_bottom = m[:, h - band_h :, :].mean(dim=(1, 2))

    # left-right asymmetry: compare with the mirror image about the bounding box's vertical mid-line
    src = (left + right).view(b, 1) - torch.arange(w).view(1, w)
    valid = ((src >= 0) & (src < w)).float().view(b, 1, w)
    mirror = x.gather(2, src.clamp(0, w - 1).view(b, 1, w).expand(b, h, w)) * valid
    union = (mask | (mirror > fg_level)).float()
    difference = ((x - mirror).abs() * union).sum(dim=(1, 2))
    asymmetry = difference / ((x + mirror) * union).sum(dim=(1, 2)).clamp_min(1e-8)

    # whole image: mean intensity of the border bands (bright = inverted photo) and the brightest pixel
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[band_h : h - band_h, band_w : w - band_w] = False
    border = x[:, ring].mean(dim=1)
    peak = x.flatten(1).amax(dim=1)

    attrs = {
        "area": count / (h * w),
        "width": box_w / w,
        "height": box_h / h,
        "aspect": box_w / box_h.clamp_min(1.0),
        "offset_x": (cx - (w - 1) / 2) / w,
        "offset_y": (cy - (h - 1) / 2) / h,
        "orientation": orientation,
        "tilt": tilt,
        "elongation": elongation,
        "brightness": brightness,
        "fill": fill,
        "hollowness": hollowness,
        "contrast": contrast,
        "texture": texture,
        "edge_left": edge_left,
        "edge_right": edge_right,
        "edge_top": edge_top,
        "edge_bottom": edge_bottom,
        "asymmetry": asymmetry,
        "border": border,
        "peak": peak,
    }
    return {k: torch.where(has, v, torch.zeros(())).float() for k, v in attrs.items()}


def measure(image: Tensor, fg_level: float = FG_LEVEL) -> dict[str, float]:
    """Attributes of one image ``[H, W]`` (or ``[C, H, W]``, channels averaged) float in ``[0, 1]``.

    * ``area``: fraction of pixels on the object (brighter than ``fg_level``); 0 means a blank image.
    * ``width``, ``height``: bounding box size as fractions of the image width / height.
    * ``aspect``: bounding box width / height in pixels (> 1 = wide).
    * ``offset_x``, ``offset_y``: intensity-weighted centroid minus the image centre, in fractions of the
      image size; positive = right / down.
    * ``orientation``: principal axis (second moments) from vertical, degrees in (-90, 90], positive = the
      top leans right. ``tilt``: the same axis measured from the nearest of vertical / horizontal, in
      (-45, 45], positive = rotated clockwise. ``elongation``: sqrt of the ratio of the moment eigenvalues
      (1 = round; the tilt is meaningless for round objects).
    * ``brightness``: mean intensity of the object. ``contrast``: std of its intensities. ``texture``: mean
      absolute intensity gradient inside the object (its outline excluded): high = patterned.
    * ``fill``: object pixels / bounding box area. ``hollowness``: share of the object's row-and-column
      span that is background, i.e. holes and gaps enclosed by the object (0 = solid).
    * ``edge_left`` etc.: fraction of the band (10% of the size) along that border covered by the object.
    * ``asymmetry``: mean absolute difference to the left-right mirror about the bounding box centre,
      relative to the intensity there (0 = symmetric, 1 = no overlap).
    * ``border``: mean intensity of the four border bands (background and object alike; high = a bright
      background, as in an inverted photo). ``peak``: the brightest pixel (low = a faint image).
    """
    if image.dim() == 3:
        image = image.float().mean(dim=0)
    if image.dim() != 2:
        raise ValueError(f"expected an image [H, W] or [C, H, W], got shape {tuple(image.shape)}")
    return {k: float(v[0]) for k, v in measure_batch(image.unsqueeze(0), fg_level=fg_level).items()}


# ---------------------------------------------------------------------------------------------------------
# Describing


@dataclass(frozen=True)
class AttributeThresholds:
    """When each phrase fires.

    The defaults were chosen from the attribute distributions of 10k Fashion-MNIST training images in model
    format (padded to 32x32): size, shape, brightness, fill, holes, texture and symmetry at roughly their
    15th / 85th percentiles, so each of those phrases fires on 9-18% of real images. Position, tilt and
    edge thresholds are the same in both directions and set to visible amounts (5% of the size, 8 degrees,
    a fifth of the border band); as Fashion-MNIST objects are centred and upright, "shifted left", "shifted
    up", "tilted right" and the left / right / top cut-offs are rare there (under 5%), while "shifted
    right / down", "tilted left" (mostly shoes) and "cut off at the bottom edge" fire on 15-24%.
    "tilted right" means rotated clockwise from the nearest upright or level pose.
    "inverted" (a bright background) and "faint" (no pixel brighter than ``faint_peak``) never fire on
    real Fashion-MNIST (border-band mean at most 0.23; every image has a pixel above 0.99); they name the
    ``invert`` and ``low_contrast`` nuisance modes of :mod:`longtail.data.nuisance` and, when they fire,
    are always kept (they take the first of the ``max_phrases`` places).
    """

    small_area: float = 0.22  # "small" below (fraction of pixels on the object)
    large_area: float = 0.47  # "large" above
    tall_aspect: float = 0.55  # "tall" below (bounding box width / height)
    wide_aspect: float = 1.8  # "wide" above
    tilt_deg: float = 8.0  # "tilted left / right" beyond +-this many degrees ...
    tilt_min_elongation: float = 1.3  # ... when the object is elongated enough to have an axis
    shift: float = 0.05  # "shifted left / right / up / down": centroid offset beyond this fraction
    dark: float = 0.45  # "dark" below (mean object intensity in [0, 1])
    bright: float = 0.78  # "bright" above
    thin_fill: float = 0.55  # "thin" below (object pixels / bounding box area)
    hollow: float = 0.08  # "hollow" above (hollowness: enclosed background share)
    plain_texture: float = 0.05  # "plain" below (mean gradient inside the object)
    patterned_texture: float = 0.125  # "patterned" above
    cut_off: float = 0.2  # "cut off at the <edge> edge" above (coverage of the border band)
    asymmetric: float = 0.45  # "asymmetric" above (left-right mirror difference)
    blank_area: float = 0.002  # "blank" (and nothing else) below this area
    inverted_border: float = 0.5  # "inverted" above (mean intensity of the border bands)
    faint_peak: float = 0.4  # "faint" below (brightest pixel)


# Medians of the attributes on the same Fashion-MNIST sample; they only set the unit of salience.
TYPICAL: dict[str, float] = {
    "area": 0.35,
    "log_aspect": math.log(0.79),
    "tilt": 0.0,
    "offset_x": 0.0,
    "offset_y": 0.0,
    "brightness": 0.65,
    "fill": 0.72,
    "hollowness": 0.0,
    "texture": 0.078,
    "edge": 0.0,
    "asymmetry": 0.13,
    "border": 0.04,
    "peak": 1.0,
}


@dataclass(frozen=True)
class Rule:
    """One phrase: fires when ``attr`` is beyond ``threshold`` (above it if ``above`` else below it).

    ``always``: when it fires it is kept ahead of the most salient ones (see :func:`describe_batch`).
    """

    phrase: str
    attr: str
    above: bool
    threshold: float
    typical: float
    always: bool = False

    def salience(self, value: Tensor) -> Tensor:
        """Distance beyond the threshold in units of ``|threshold - typical|``; positive = fires. ``[B]``."""
        unit = max(abs(self.threshold - self.typical), 1e-6)
        return ((value - self.threshold) if self.above else (self.threshold - value)) / unit


def phrase_rules(th: AttributeThresholds) -> list[Rule]:
    """All phrases in their fixed caption order: whole-image checks (inverted, faint), size, shape, tilt,
    position, brightness, fill, texture, cut-off edges, symmetry."""
    t = TYPICAL
    rules = [
        Rule("inverted", "border", True, th.inverted_border, t["border"], always=True),
        Rule("faint", "peak", False, th.faint_peak, t["peak"], always=True),
        Rule("small", "area", False, th.small_area, t["area"]),
        Rule("large", "area", True, th.large_area, t["area"]),
        Rule("wide", "log_aspect", True, math.log(th.wide_aspect), t["log_aspect"]),
        Rule("tall", "log_aspect", False, math.log(th.tall_aspect), t["log_aspect"]),
        Rule("tilted left", "tilt", False, -th.tilt_deg, t["tilt"]),
        Rule("tilted right", "tilt", True, th.tilt_deg, t["tilt"]),
        Rule("shifted left", "offset_x", False, -th.shift, t["offset_x"]),
        Rule("shifted right", "offset_x", True, th.shift, t["offset_x"]),
        Rule("shifted up", "offset_y", False, -th.shift, t["offset_y"]),
        Rule("shifted down", "offset_y", True, th.shift, t["offset_y"]),
        Rule("dark", "brightness", False, th.dark, t["brightness"]),
        Rule("bright", "brightness", True, th.bright, t["brightness"]),
        Rule("hollow", "hollowness", True, th.hollow, t["hollowness"]),
        Rule("thin", "fill", False, th.thin_fill, t["fill"]),
        Rule("plain", "texture", False, th.plain_texture, t["texture"]),
        Rule("patterned", "texture", True, th.patterned_texture, t["texture"]),
    ]
    rules += [Rule(f"cut off at the {e} edge", f"edge_{e}", True, th.cut_off, t["edge"]) for e in EDGES]
    rules.append(Rule("asymmetric", "asymmetry", True, th.asymmetric, t["asymmetry"]))
    return rules


PHRASES: tuple[str, ...] = (*(r.phrase for r in phrase_rules(AttributeThresholds())), "blank")


def saliences(attrs: dict[str, Tensor], th: AttributeThresholds) -> Tensor:
    """Salience of every rule of :func:`phrase_rules` for a batch of attributes -> ``[B, R]``; > 0 = fires."""
    values = dict(attrs)
    values["log_aspect"] = torch.log(attrs["aspect"].clamp_min(1e-3))
    columns = []
    for rule in phrase_rules(th):
        s = rule.salience(values[rule.attr].float())
        if rule.attr == "tilt":  # a roundish object has no meaningful axis
            s = torch.where(values["elongation"] >= th.tilt_min_elongation, s, torch.full_like(s, -1.0))
        columns.append(s)
    return torch.stack(columns, dim=1)


def describe_batch(
    attrs: dict[str, Tensor], thresholds: AttributeThresholds | None = None, max_phrases: int | None = None
) -> list[list[str]]:
    """Phrases for each image of a batch of attributes (``{name: [B]}`` from :func:`measure_batch`).

    A phrase is emitted when its attribute is beyond its threshold. When more than ``max_phrases`` fire,
    the ``always`` ones ("inverted", "faint") and then the most salient ones (largest normalised distance
    beyond the threshold) are kept; the kept phrases are listed in the fixed order of :func:`phrase_rules`.
    An image without an object is ``["blank"]``.
    """
    th = thresholds or AttributeThresholds()
    rules = phrase_rules(th)
    sal = saliences(attrs, th)
    limit = len(rules) if max_phrases is None else max(0, max_phrases)
    always = torch.tensor([r.always for r in rules]).view(1, -1)
    rank = torch.where(always & (sal > 0), torch.full_like(sal, math.inf), sal)
    order = torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :limit]
    keep = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, order, True) & (sal > 0)
    blank = attrs["area"] < th.blank_area
    out: list[list[str]] = []
    for row, is_blank in zip(keep.tolist(), blank.tolist(), strict=True):
        out.append(["blank"] if is_blank else [rules[j].phrase for j, k in enumerate(row) if k])
    return out


def describe(
    attrs: dict[str, float], thresholds: AttributeThresholds | None = None, max_phrases: int | None = None
) -> list[str]:
    """Phrases for one image's attributes (from :func:`measure`); see :func:`describe_batch`."""
    batch = {k: torch.tensor([float(v)]) for k, v in attrs.items()}
    return describe_batch(batch, thresholds, max_phrases)[0]


# ---------------------------------------------------------------------------------------------------------
# Captioning


def with_article(noun: str) -> str:
    """``"a sandal"``, ``"an ankle boot"`` (article from the first letter)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def compose_caption(class_name: str, phrases: Sequence[str]) -> str:
    """``"a photo of a <class>"`` followed by the phrases, comma separated."""
    return ", ".join([f"a photo of {with_article(class_name)}", *phrases])


def to_unit_gray(images: Tensor) -> Tensor:
    """Model-range ``[B, C, H, W]`` (or ``[B, H, W]``) in ``[-1, 1]`` -> gray ``[B, H, W]`` in ``[0, 1]``."""
    if images.dim() == 4:
        images = images.float().mean(dim=1)
    if images.dim() != 3:
        raise ValueError(f"expected images [B, C, H, W] or [B, H, W], got shape {tuple(images.shape)}")
    return ((images.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch CPU ops on ``n`` threads (no change for None)."""
    previous = torch.get_num_threads()
    if n is not None and n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@dataclass
class AttributeCaptioner:
    """Deterministic captioner: measures each image (:func:`measure_batch`) and names its salient attributes.

    ``caption`` returns e.g. ``"a photo of an ankle boot, large, tilted left, patterned"`` with at most
    ``max_phrases`` phrases.
    """

    max_phrases: int = 4
    thresholds: AttributeThresholds = field(default_factory=AttributeThresholds)
    fg_level: float = FG_LEVEL
    batch_size: int = 512
    # Torch threads while measuring (None = leave as is). The many small element-wise ops gain nothing from
    # more threads and slow down badly (15x measured) when another process shares the cores.
    num_threads: int | None = 1

    def phrases(self, images: Tensor) -> list[list[str]]:
        """Phrases per image for model-range images ``[B, 1 or 3, H, W]`` in ``[-1, 1]``."""
        gray = to_unit_gray(images)
        out: list[list[str]] = []
        with _torch_threads(self.num_threads):
            for start in range(0, gray.shape[0], self.batch_size):
                attrs = measure_batch(gray[start : start + self.batch_size], fg_level=self.fg_level)
                out += describe_batch(attrs, self.thresholds, self.max_phrases)
        return out

    def caption(self, images: Tensor, class_names: Sequence[str]) -> list[str]:
        """``"a photo of a <class>, <phrase>, ..."`` for each image ``[B, 1 or 3, H, W]`` in ``[-1, 1]``."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(class_names)} class names")
        return [compose_caption(c, p) for c, p in zip(class_names, self.phrases(images), strict=True)]
