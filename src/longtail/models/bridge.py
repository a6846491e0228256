"""The decoder -> classifier bridge: decoded images into the classifier's own preprocessing, differentiably.

``ClassifierBridge`` maps decoded images (``[B, 3, H, W]`` in [-1, 1]) into a classifier's input convention
(channels, resize, center crop, mean/std; ``BridgeConfig``, read from timm's data config, torchvision's
weights transforms or a transformers image processor) with differentiable ops only, so the longtail gradient flows from the classifier back to
the latent. ``BridgedClassifier`` is ``classifier(bridge(x))``, the callable ``generate`` / ``sample`` take.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..outputs import ClassifierOutput


@dataclass(frozen=True)
class BridgeConfig:
    """A classifier's preprocessing, applied to decoded images in [-1, 1].

    ``resize``: shorter side (int, aspect kept, as torchvision's ``Resize(int)``) or exact ``(H, W)``; then a
    center crop to ``size`` (``(H, W)``); ``None`` skips the step. The image is scaled to [0, 1] and
    normalised by ``mean``/``std``. The defaults (no resize, mean = std = 0.5) pass the decoder's [-1, 1]
    images unchanged. ``in_channels``: what the classifier reads; ``None`` keeps the decoder's channels (rule:
    ``match_channels``). ``crop_offset``: where the center crop starts, ``round((H - h) / 2)`` as torchvision
    and timm do, or ``floor((H - h) / 2)`` as transformers' image processors do (they differ for odd margins).
    ``clamp_resize``: resize as 8-bit resizers do (PIL, torchvision on uint8 tensors, hence transformers' image
    processors): two separable passes, width then height, each clamped to [0, 1]; bicubic overshoot at sharp edges
    is cut after the first pass (``resize_passes``). The clamp is straight-through, so the gradient is kept.
    """

    size: tuple[int, int] | None = None
    resize: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"
    in_channels: int | None = None
    source: str = "explicit"
    crop_offset: str = "round"
    clamp_resize: bool = False

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest", "area", "nearest-exact"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset must be 'round' (torchvision) or 'floor' (transformers), "
                             f"got {self.crop_offset!r}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BridgeConfig:
        """From a plain dict (JSON / YAML); ``size`` and ``resize`` accept an int or a pair."""
        d = dict(data)
        if d.get("size") is not None:
            size = d["size"]
            d["size"] = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if d.get("resize") is not None and not isinstance(d["resize"], int):
            d["resize"] = tuple(int(s) for s in d["resize"])
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown bridge settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_timm(cls, model: nn.Module) -> BridgeConfig:
        """From a timm model's resolved data config (``input_size``, ``crop_pct``, ``crop_mode``, ...).

        Eval transform as timm builds it: resize to ``floor(size / crop_pct)`` (the shorter side for a square
        input, exact for ``crop_mode="squash"``), then center crop to ``input_size``. A non-square input in
        ``center`` mode (timm keeps the aspect ratio there) is approximated by an exact resize.
        """
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        channels, h, w = cfg["input_size"]
        crop_pct = cfg.get("crop_pct") or 0.875
        mode = cfg.get("crop_mode") or "center"
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        if mode == "squash" or scale[0] != scale[1]:
            resize: int | tuple[int, int] = scale
        elif mode == "center":
            resize = scale[0]
        else:
            raise ValueError(
                f"timm crop_mode {mode!r} is not supported by the bridge; pass an explicit BridgeConfig"
            )
        interp = cfg.get("interpolation", "bilinear")
        return cls(
            size=(h, w),
            resize=resize,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
            in_channels=int(channels),
            source=f"timm {getattr(model, 'default_cfg', {}).get('architecture', '')}",
        )

    @classmethod
    def from_transformers(cls, processor: object, in_channels: int | None = None) -> BridgeConfig:
        """From a transformers image processor (``ViTImageProcessor``, ``ConvNextImageProcessor`` incl. its
        ``crop_pct`` rule, ...): ``models.hf.bridge_from_processor``, which documents the rules and errors."""
        from .hf import bridge_from_processor

        return bridge_from_processor(processor, in_channels)

    @classmethod
    def from_torchvision(cls, weights: object, in_channels: int = 3) -> BridgeConfig:
        """From torchvision weights, their name (``"ResNet50_Weights.IMAGENET1K_V2"``) or ``transforms()``.

        Uses the transform's ``resize_size`` / ``crop_size`` / ``mean`` / ``std`` / ``interpolation``;
        building the transform downloads nothing.
        """
        import torchvision

        if isinstance(weights, str):
            weights = torchvision.models.get_weight(weights)
        transform = weights.transforms() if hasattr(weights, "transforms") else weights
        resize = list(transform.resize_size)
        crop = list(transform.crop_size)
        crop = crop * 2 if len(crop) == 1 else crop
        interp = getattr(transform.interpolation, "value", str(transform.interpolation))
        return cls(
            size=(int(crop[0]), int(crop[1])),
            resize=int(resize[0]) if len(resize) == 1 else (int(resize[0]), int(resize[1])),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            interpolation=interp,
            in_channels=in_channels,
            source=f"torchvision {weights}",
        )


def match_channels(x: Tensor, channels: int | None) -> Tensor:
    """Adapt ``[B, C, H, W]`` to ``channels``: equal -> unchanged; RGB -> 1 channel: the unweighted mean over
    channels; 1 -> N channels: the single channel repeated. Anything else is an error."""
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(
        f"cannot map {c}-channel images to a {channels}-channel classifier (only 1 <-> N is defined)"
    )


def _resized_size(h: int, w: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's rule: an int sets the shorter side, the longer becomes ``int(size * long / short)``."""
    if not isinstance(resize, int):
        return (int(resize[0]), int(resize[1]))
    if h <= w:
        return (resize, int(resize * w / h))
    return (int(resize * h / w), resize)


def center_crop(x: Tensor, size: tuple[int, int], offset: str = "round") -> Tensor:
    """torchvision's ``center_crop`` (zero padding when the crop is larger than the image); the crop starts at
    ``round(margin / 2)`` (torchvision, ``offset="round"``) or ``floor(margin / 2)`` (transformers, ``"floor"``)."""
    ch, cw = size
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad = [
            (cw - w) // 2 if cw > w else 0,
            (cw - w + 1) // 2 if cw > w else 0,
            (ch - h) // 2 if ch > h else 0,
            (ch - h + 1) // 2 if ch > h else 0,
        ]
        x = F.pad(x, pad, value=0.0)
        h, w = x.shape[-2:]
    if offset == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    return x[..., top : top + ch, left : left + cw]


def straight_through_clamp(x: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """``x.clamp(low, high)`` in the forward pass, the identity in the backward pass (a straight-through
    estimator), so saturated pixels keep their gradient. Any shape."""
    return x + (x.clamp(low, high) - x).detach()


def resize_passes(x: Tensor, size: tuple[int, int], mode: str, clamp: bool) -> Tensor:
    """``F.interpolate`` of ``[B, C, H, W]`` to ``size`` (antialiased for bilinear / bicubic, as torchvision and
    PIL are). With ``clamp``: width first, then height, each pass clamped to [0, 1] (``straight_through_clamp``),
    as PIL and torchvision's uint8 path do; antialiased separable kernels make one pass per axis equal to the joint
    resize up to that clamp."""
    smooth = mode in ("bilinear", "bicubic")
    kwargs = {"mode": mode, "antialias": smooth, "align_corners": False if smooth else None}
    if not clamp:
        return F.interpolate(x, size=size, **kwargs)
    if size[1] != x.shape[-1]:
        x = straight_through_clamp(F.interpolate(x, size=(x.shape[-2], size[1]), **kwargs))
    if size[0] != x.shape[-2]:
        x = straight_through_clamp(F.interpolate(x, size=size, **kwargs))
    return x


class ClassifierBridge(nn.Module):
    """Differentiable preprocessing from the decoder's output to a classifier's input.

    ``[B, C, H, W]`` in [-1, 1] -> ``[B, C', h, w]`` float32: channels matched (``match_channels``), scaled to
    [0, 1], resized (``F.interpolate``, antialiased for bilinear/bicubic, as torchvision does on tensors),
    center cropped, normalised by mean/std. No clamping (``clamp_resize`` clamps straight-through), so
    out-of-range pixels keep their gradient.
    """

    def __init__(self, config: BridgeConfig | None = None, **overrides: object) -> None:
        super().__init__()
        config = config or BridgeConfig()
        self.config = BridgeConfig.from_dict({**config.to_dict(), **overrides}) if overrides else config
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_timm(cls, model: nn.Module) -> ClassifierBridge:
        return cls(BridgeConfig.from_timm(model))

    @classmethod
    def from_torchvision(cls, weights: object, in_channels: int = 3) -> ClassifierBridge:
        return cls(BridgeConfig.from_torchvision(weights, in_channels))

    def _normalise(self, x: Tensor) -> Tensor:
        mean, std = self.mean, self.std
        c = x.shape[1]
        if len(mean) not in (1, c):
            if c != 1:
                raise ValueError(f"bridge mean/std have {len(mean)} values for {c}-channel images")
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)  # a grayscale view of RGB stats
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Decoded images ``[B, C, H, W]`` in [-1, 1] -> classifier input ``[B, C', h, w]`` (float32)."""
        cfg = self.config
        x = match_channels(x.float(), cfg.in_channels)
        x = (x + 1.0) / 2.0
        if cfg.resize is not None:
            size = _resized_size(x.shape[-2], x.shape[-1], cfg.resize)
            if size != tuple(x.shape[-2:]):
                x = resize_passes(x, size, cfg.interpolation, cfg.clamp_resize)
        if cfg.size is not None:
            x = center_crop(x, cfg.size, cfg.crop_offset)
        return self._normalise(x)

    def extra_repr(self) -> str:
        return repr(self.config)


class BridgedClassifier(nn.Module):
    """``classifier(bridge(x))``: the callable to pass as ``classifier=`` to ``generate`` / ``sample``.

    The bridged input is cast to the classifier's parameter dtype; the output (logits or ``ClassifierOutput``)
    is passed through unchanged.
    """

    def __init__(self, bridge: ClassifierBridge, classifier: nn.Module) -> None:
        super().__init__()
        self.bridge = bridge
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor | ClassifierOutput:
        param = next(self.classifier.parameters(), None)
        x = self.bridge(x)
        return self.classifier(x.to(param.dtype) if param is not None else x)
