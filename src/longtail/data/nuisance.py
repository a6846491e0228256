"""Nuisance modes: rare ways of showing a garment, so that the embedded long tail exists *inside* classes.

Fashion-MNIST garments are centred, upright and contrast-normalised, so on its own the embedded testbed has
a long tail only between classes. The paper's mechanism (METHOD.md sections 3-5) is about rare modes inside
a class: extreme views, occlusion, cut-off objects (ImageNet-A). This module adds such modes as
deterministic image transforms, applied to a few percent of the training images (:func:`assign_modes`,
:func:`with_modes`) and to whole test splits (:func:`nuisance_test_split`).

Every mode maps a batch ``[N, 1, H, W]`` (or ``[N, C, H, W]``) float in ``[-1, 1]`` with background level
``BACKGROUND = -1`` (black, as :func:`longtail.data.datasets.to_model_range` pads) to a batch of the same
shape, dtype and range. Randomness comes only from the ``torch.Generator`` (or integer seed) passed in, so
the same seed gives bit-identical output. A mode is split into ``draw`` (per-image parameters from the
generator) and ``render`` (a pure function of images and parameters), so tests and users can render a mode
with chosen parameters.

=============== =========================================================================== =====================
mode            what it does (parameters drawn per image)                                   caption phrase
=============== =========================================================================== =====================
``rotate``      rotation about the image centre by 60-120 degrees, either way (``angle``;     "rotated"
                positive = clockwise on screen, the captioner's convention), bilinear,
                background fills the corners
``corner``      scaled to 45-55% (``scale``) and moved flush into one of the four corners     "small in a corner"
                (``corner``: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)
``occlude``     a solid bar across the garment's bounding box, horizontal or vertical         "partly covered"
                (``vertical``), dark (-1) or bright (+1) (``bright``), covering a fraction
                ``fraction`` in [0.25, 0.35] of the garment's pixels (plus at most one row)
``cutoff``      shifted by whole pixels towards one border (``border``: 0 left, 1 right,      "partly out of frame"
                2 top, 3 bottom) until a fraction ``fraction`` in [0.30, 0.45] of the
                garment's mass (plus at most one column) has left the frame
``invert``      contrast inversion ``x -> -x`` (white background, dark garment)              "inverted"
``low_contrast`` deviation from the background scaled by ``LOW_CONTRAST = 0.25``            "faint"
``blur``        Gaussian blur, ``BLUR_SIGMA = 1.5`` pixels, background-padded                "blurry"
``upside_down`` rotation by 180 degrees (both axes flipped)                                   "upside down"
=============== =========================================================================== =====================

The garment is the set of pixels brighter than ``FOREGROUND = -0.8`` (0.1 in ``[0, 1]``, the attribute
captioner's ``FG_LEVEL``); its mass is the sum of ``x - BACKGROUND``. Mode ids are positions in
:data:`MODE_NAMES`; ``-1`` (:data:`CLEAN`) means no mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BACKGROUND = -1.0  # background level of model-range Fashion-MNIST images
FOREGROUND = -0.8  # a pixel belongs to the garment when brighter than this
CLEAN = -1  # mode id of an image without a nuisance mode

ROTATE_DEGREES = (60.0, 120.0)
CORNER_SCALE = (0.45, 0.55)
OCCLUDE_FRACTION = (0.25, 0.35)
CUTOFF_FRACTION = (0.30, 0.45)
LOW_CONTRAST = 0.25
BLUR_SIGMA = 1.5

Params = dict[str, Tensor]
GeneratorLike = torch.Generator | int


def _generator(generator: GeneratorLike) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, or a fresh one seeded with the given integer."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"expected a torch.Generator or an integer seed, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def _check_images(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got {images.dtype}")


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _coin(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator).bool()


# ---------------------------------------------------------------------------------------------------------
# Geometry


def _affine(images: Tensor, matrix: Tensor, shift: Tensor) -> Tensor:
    """Resample ``images [N, C, H, W]``: output pixel ``p`` (pixel units, relative to the image centre, x right,
    y down) takes the input at ``matrix[n] @ p + shift[n]`` (``matrix [N, 2, 2]``, ``shift [N, 2]``).

    Bilinear; whatever comes from outside the frame is background.
    """
    n, _, h, w = images.shape
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)  # pixels -> normalised (align_corners=False)
    theta = torch.empty(n, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = scale.view(1, 2, 1) * matrix.double() / scale.view(1, 1, 2)
    theta[:, :, 2] = scale.view(1, 2) * shift.double()
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images - BACKGROUND, grid.to(images.device), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return (out + BACKGROUND).clamp(-1.0, 1.0)


def draw_rotate(n: int, generator: torch.Generator) -> Params:
    """``angle [N]`` float64 degrees: magnitude uniform in ``ROTATE_DEGREES``, sign random."""
    magnitude = _uniform(n, ROTATE_DEGREES, generator)
    sign = torch.where(_coin(n, generator), 1.0, -1.0).double()
    return {"angle": magnitude * sign}


def render_rotate(images: Tensor, params: Params) -> Tensor:
    """Rotate each image about its centre by ``params["angle"]`` degrees, positive = clockwise on screen.

    A point at ``(x, y)`` from the centre (y down) moves to ``(x cos a - y sin a, x sin a + y cos a)``.
    """
    a = torch.deg2rad(params["angle"].double())
    c, s = torch.cos(a), torch.sin(a)
    inverse = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # rotation by -a
    return _affine(images, inverse, torch.zeros(len(a), 2, dtype=torch.float64))


def draw_corner(n: int, generator: torch.Generator) -> Params:
    """``scale [N]`` float64 uniform in ``CORNER_SCALE``; ``corner [N]`` int64 in 0..3 (TL, TR, BL, BR)."""
    scale = _uniform(n, CORNER_SCALE, generator)
    return {"scale": scale, "corner": torch.randint(0, 4, (n,), generator=generator)}


def render_corner(images: Tensor, params: Params) -> Tensor:
    """Shrink the whole frame by ``scale`` and put it flush into corner ``corner`` (0 TL, 1 TR, 2 BL, 3 BR)."""
    _, _, h, w = images.shape
    scale, corner = params["scale"].double(), params["corner"].long()
    sx = torch.where(corner % 2 == 1, 1.0, -1.0).double()
    sy = torch.where(corner >= 2, 1.0, -1.0).double()
    centre = torch.stack([sx * (1 - scale) * w / 2, sy * (1 - scale) * h / 2], -1)  # of the shrunk frame
    matrix = torch.diag_embed(torch.stack([1 / scale, 1 / scale], -1))
    return _affine(images, matrix, -centre / scale.view(-1, 1))


def draw_upside_down(n: int, generator: torch.Generator) -> Params:
    """No parameters."""
    return {}


def render_upside_down(images: Tensor, params: Params) -> Tensor:
    """Rotate by 180 degrees (exact: both spatial axes flipped)."""
    return images.flip(-2, -1)


# ---------------------------------------------------------------------------------------------------------
# Occlusion and cut-off


def _garment(images: Tensor) -> Tensor:
    """bool ``[N, H, W]``: channel-mean pixels brighter than ``FOREGROUND``."""
    return images.mean(dim=1) > FOREGROUND


def draw_occlude(n: int, generator: torch.Generator) -> Params:
    """``fraction [N]`` float64 uniform in ``OCCLUDE_FRACTION``; ``vertical``, ``bright`` bool ``[N]``;
    ``position [N]`` float64 uniform in [0, 1) (which of the feasible start rows the bar begins at)."""
    return {
        "fraction": _uniform(n, OCCLUDE_FRACTION, generator),
        "vertical": _coin(n, generator),
        "bright": _coin(n, generator),
        "position": torch.rand(n, generator=generator, dtype=torch.float64),
    }


def occluder_mask(images: Tensor, params: Params) -> Tensor:
    """bool ``[N, H, W]``: the bar :func:`render_occlude` paints.

    For a horizontal bar (``vertical`` false): the rows ``[r0, r1)`` across the garment's columns, where r0 is
    a garment row from which at least ``fraction`` of the garment's pixels lie at or below (the
    ``position``-th quantile of those rows) and r1 the first row at which the bar holds ``fraction`` of them.
    A vertical bar is the same on the transposed image. A blank image counts as all garment.
    """
    _check_images(images)
    mask = _garment(images)
    mask = torch.where(mask.flatten(1).any(1).view(-1, 1, 1), mask, torch.ones_like(mask))
    vertical = params["vertical"].bool()
    out = torch.zeros_like(mask)
    for flip in (False, True):
        chosen = (vertical == flip).nonzero().squeeze(1)
        if chosen.numel() == 0:
            continue
        m = mask[chosen].transpose(1, 2) if flip else mask[chosen]
        bar = _row_bar(m, params["fraction"][chosen].double(), params["position"][chosen].double())
        out[chosen] = bar.transpose(1, 2) if flip else bar
    return out


def _row_bar(mask: Tensor, fraction: Tensor, position: Tensor) -> Tensor:
    """Horizontal bar over bool garment masks ``[n, H, W]`` (every mask non-empty); see :func:`occluder_mask`."""
    _, h, w = mask.shape
    rows = mask.sum(dim=2).double()  # [n, H]
    total = rows.sum(dim=1, keepdim=True)
    need = fraction.view(-1, 1) * total
    before = rows.cumsum(1) - rows  # garment pixels above each row
    feasible = (rows > 0) & (total - before >= need)  # the first garment row is always feasible
    count = feasible.sum(dim=1)
    k = (position * count).floor().long().clamp(max=count - 1)
    r0 = (feasible.long().cumsum(1) > k.view(-1, 1)).long().argmax(dim=1)
    start = before.gather(1, r0.view(-1, 1))
    r1 = (rows.cumsum(1) - start >= need).long().argmax(dim=1) + 1
    cols = mask.any(dim=1)
    c0 = cols.long().argmax(dim=1)
    c1 = w - cols.flip(1).long().argmax(dim=1)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    return ((ys >= r0.view(-1, 1, 1)) & (ys < r1.view(-1, 1, 1)) & (xs >= c0.view(-1, 1, 1))
            & (xs < c1.view(-1, 1, 1)))


def render_occlude(images: Tensor, params: Params) -> Tensor:
    """Paint the bar of :func:`occluder_mask` with -1 (dark) or +1 (``bright``) in every channel."""
    bar = occluder_mask(images, params).unsqueeze(1)
    value = torch.where(params["bright"].bool(), 1.0, -1.0).to(images.dtype).view(-1, 1, 1, 1)
    return torch.where(bar, value, images)


def draw_cutoff(n: int, generator: torch.Generator) -> Params:
    """``fraction [N]`` float64 uniform in ``CUTOFF_FRACTION``; ``border [N]`` int64 in 0..3 (L, R, T, B)."""
    fraction = _uniform(n, CUTOFF_FRACTION, generator)
    return {"fraction": fraction, "border": torch.randint(0, 4, (n,), generator=generator)}


def cutoff_shift(images: Tensor, params: Params) -> Tensor:
    """int64 ``[N]``: pixels by which :func:`render_cutoff` moves each image towards its border.

    The smallest shift that pushes at least ``fraction`` of the garment's mass (``x - BACKGROUND`` summed over
    the garment pixels) out of the frame; 0 for a blank image.
    """
    _check_images(images)
    mass = ((images.mean(dim=1) - BACKGROUND) * _garment(images)).double().cpu()  # [N, H, W]
    border = params["border"].long()
    fraction = params["fraction"].double()
    shift = torch.zeros(len(border), dtype=torch.long)
    for horizontal in (True, False):
        idx = ((border <= 1) == horizontal).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        profile = mass[idx].sum(dim=1 if horizontal else 2)  # per column (left / right) or per row
        leading = torch.where((border[idx] % 2 == 1).view(-1, 1), profile.flip(1), profile)  # border first
        total = leading.sum(dim=1)
        steps = (leading.cumsum(1) < fraction[idx].view(-1, 1) * total.view(-1, 1)).sum(dim=1) + 1
        shift[idx] = torch.where(total > 0, steps, torch.zeros_like(steps))
    return shift


def render_cutoff(images: Tensor, params: Params) -> Tensor:
    """Shift each image by whole pixels towards ``border`` (0 left, 1 right, 2 top, 3 bottom) by
    :func:`cutoff_shift`; the pixels that enter are background. Exact (no interpolation)."""
    n, c, h, w = images.shape
    border = params["border"].long()
    shift = cutoff_shift(images, params)
    dx = torch.where(border == 0, shift, torch.where(border == 1, -shift, 0))  # output x reads input x + dx
    dy = torch.where(border == 2, shift, torch.where(border == 3, -shift, 0))
    ys = torch.arange(h).view(1, h, 1) + dy.view(-1, 1, 1)
    xs = torch.arange(w).view(1, 1, w) + dx.view(-1, 1, 1)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)  # [N, H, W]
    flat = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    moved = images.flatten(2).gather(2, flat.to(images.device)).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1).to(images.device), moved, torch.full_like(moved, BACKGROUND))


# ---------------------------------------------------------------------------------------------------------
# Photometry


def _no_params(n: int, generator: torch.Generator) -> Params:
    return {}


def render_invert(images: Tensor, params: Params) -> Tensor:
    """Contrast inversion ``x -> -x`` (black background becomes white)."""
    return -images


def render_low_contrast(images: Tensor, params: Params) -> Tensor:
    """``BACKGROUND + LOW_CONTRAST * (x - BACKGROUND)``: the garment keeps its shape at a quarter of its contrast."""
    return BACKGROUND + LOW_CONTRAST * (images - BACKGROUND)


def render_blur(images: Tensor, params: Params) -> Tensor:
    """Separable Gaussian blur with ``BLUR_SIGMA``; outside the frame counts as background."""
    from ..guidance import gaussian_kernel1d  # the one Gaussian kernel of the package

    c = images.shape[1]
    k = gaussian_kernel1d(BLUR_SIGMA).to(images)
    r = (len(k) - 1) // 2
    x = images - BACKGROUND  # zero padding = background
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return (x + BACKGROUND).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class NuisanceMode:
    """One mode: ``draw(n, generator) -> params`` (tensors with leading dim n) and ``render(images, params)``.

    Calling the mode, ``mode(images, generator)``, draws the parameters and renders: ``[N, C, H, W]`` float in
    ``[-1, 1]`` -> same shape and range. Raises ValueError for other shapes or integer images, TypeError for a
    generator that is neither a ``torch.Generator`` nor an int.
    """

    name: str
    phrase: str
    draw: Callable[[int, torch.Generator], Params]
    render: Callable[[Tensor, Params], Tensor]
    random: bool = True  # whether the output depends on the generator

    def __call__(self, images: Tensor, generator: GeneratorLike) -> Tensor:
        _check_images(images)
        params = self.draw(images.shape[0], _generator(generator))
        return self.render(images, params).to(images.dtype).clamp(-1.0, 1.0)


MODES: dict[str, NuisanceMode] = {
    m.name: m
    for m in (
        NuisanceMode("rotate", "rotated", draw_rotate, render_rotate),
        NuisanceMode("corner", "small in a corner", draw_corner, render_corner),
        NuisanceMode("occlude", "partly covered", draw_occlude, render_occlude),
        NuisanceMode("cutoff", "partly out of frame", draw_cutoff, render_cutoff),
        NuisanceMode("invert", "inverted", _no_params, render_invert, random=False),
        NuisanceMode("low_contrast", "faint", _no_params, render_low_contrast, random=False),
        NuisanceMode("blur", "blurry", _no_params, render_blur, random=False),
        NuisanceMode("upside_down", "upside down", draw_upside_down, render_upside_down, random=False),
    )
}
MODE_NAMES: tuple[str, ...] = tuple(MODES)
# 3% of the images per mode (24% with some mode, 76% clean); on the long-tailed training set (2,480 images)
# that is 74 images per mode, so a mode meets a rare class only a handful of times or never.
DEFAULT_RATES: dict[str, float] = dict.fromkeys(MODE_NAMES, 0.03)


def mode_id(name: str) -> int:
    """Position of ``name`` in :data:`MODE_NAMES`; raises KeyError naming the known modes."""
    if name not in MODES:
        raise KeyError(f"unknown nuisance mode {name!r}; known: {', '.join(MODE_NAMES)}")
    return MODE_NAMES.index(name)


def mode_phrase(mode: str | int) -> str:
    """Caption phrase of a mode given by name or id ("rotated", "small in a corner", ...); KeyError if unknown."""
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not 0 <= mode < len(MODE_NAMES):
            raise KeyError(f"unknown nuisance mode id {mode}; ids are 0..{len(MODE_NAMES) - 1}")
        mode = MODE_NAMES[mode]
    mode_id(mode)
    return MODES[mode].phrase


def apply_mode(name: str, images: Tensor, generator: GeneratorLike) -> Tensor:
    """Apply mode ``name`` to every image of ``[N, C, H, W]`` in ``[-1, 1]`` -> same shape, in ``[-1, 1]``.

    Deterministic given the generator's state (or integer seed). Raises KeyError for an unknown mode.
    """
    mode_id(name)
    return MODES[name](images, generator)


def _mode_seed(seed: int, mode: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (mode + 1)) % (2**63 - 1)


def assign_modes(labels: Tensor, rates: Mapping[str, float], seed: int) -> Tensor:
    """Mode id per image (int64 ``[N]``; -1 = clean, else an index into :data:`MODE_NAMES`).

    Exactly ``round(rate * N)`` images get each mode (Python's round), at most one mode per image; which
    images is a seeded random permutation of all N, ignoring the labels (only their number is used), so any
    subset chosen independently of it, such as a long-tailed one, has the same rates in expectation.
    Raises KeyError for an unknown mode and ValueError for a negative rate, rates summing to 1 or more, or
    counts that exceed N after rounding.
    """
    n = int(labels.shape[0])
    for name, rate in rates.items():
        mode_id(name)
        if not rate >= 0:
            raise ValueError(f"rate of mode {name!r} must be >= 0, got {rate}")
    if sum(rates.values()) >= 1:
        raise ValueError(f"nuisance rates must sum to less than 1, got {sum(rates.values())}")
    counts = [(mode_id(name), round(rate * n)) for name, rate in rates.items()]
    if sum(k for _, k in counts) > n:
        raise ValueError(f"rounded mode counts {sum(k for _, k in counts)} exceed the {n} images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    ids = torch.full((n,), CLEAN, dtype=torch.long)
    start = 0
    for mid, k in sorted(counts):
        ids[order[start : start + k]] = mid
        start += k
    return ids


def with_modes(images: Tensor, mode_ids: Tensor, seed: int) -> Tensor:
    """Apply each image's mode: ``images [N, C, H, W]`` in ``[-1, 1]``, ``mode_ids`` int ``[N]`` (-1 = clean).

    Returns a new tensor (same shape, dtype, range); clean images are copied unchanged. The images of mode m
    are transformed together, in index order, with a generator seeded from ``(seed, m)``. Raises ValueError
    for a length mismatch or an id outside ``-1..len(MODE_NAMES) - 1``.
    """
    _check_images(images)
    mode_ids = mode_ids.reshape(-1).long()
    if mode_ids.numel() != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {mode_ids.numel()} mode ids")
    if mode_ids.numel() and (int(mode_ids.min()) < CLEAN or int(mode_ids.max()) >= len(MODE_NAMES)):
        raise ValueError(f"mode ids must lie in -1..{len(MODE_NAMES) - 1}, got {mode_ids.min()}..{mode_ids.max()}")
    out = images.clone()
    for mid, name in enumerate(MODE_NAMES):
        idx = (mode_ids == mid).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = MODES[name](images[idx], torch.Generator().manual_seed(_mode_seed(seed, mid)))
    return out


def split_mode_ids(n: int, mode: str, seed: int) -> Tensor:
    """Mode ids ``[n]`` of a nuisance test split: all ``mode_id(mode)``, or for ``mode="all"`` a seeded
    shuffle of ``0, 1, ..., len(MODE_NAMES) - 1, 0, 1, ...`` (each mode on n / 8 images, give or take one)."""
    if mode != "all":
        return torch.full((n,), mode_id(mode), dtype=torch.long)
    cycle = torch.arange(n) % len(MODE_NAMES)
    return cycle[torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))]



def nuisance_test_split(images: Tensor, labels: Tensor, mode: str, seed: int) -> tuple[Tensor, Tensor]:
    """A test split with a nuisance mode on every image: ``(images [N, C, H, W] in [-1, 1], labels [N])``.

    ``images``/``labels`` are the clean balanced test set (Fashion-MNIST: 10,000 images, 1,000 per class,
    via ``to_model_range``); the result has the same size and order (so 10,000 images per split), labels
    copied. ``mode`` is a name of :data:`MODE_NAMES` (that mode on every image) or ``"all"`` (each image one
    mode, equally often; :func:`split_mode_ids` gives which). Raises KeyError for an unknown mode and
    ValueError for mismatched lengths.
    """
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {labels.shape[0]} labels")
    ids = split_mode_ids(images.shape[0], mode, seed)
    return with_modes(images, ids, seed), labels.clone()
