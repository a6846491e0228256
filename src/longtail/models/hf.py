"""Hugging Face image classifiers: ``hf:<local dir>`` specs.

A directory written by ``save_pretrained`` (``config.json`` + weights, and ``preprocessor_config.json`` from the
image processor's ``save_pretrained``) loads as ``AutoModelForImageClassification`` (transformers), offline
(``local_files_only=True``: nothing is downloaded). ``HFImageClassifier`` wraps it so that the rest of the package
sees a plain ``nn.Module`` from ``pixel_values [B, C, H, W]`` to logits ``[B, C_out]`` (the model's output object's
``.logits``), and exposes the classification layer through ``get_classifier()`` (timm's convention, which
``longtail.heads.find_head`` reads) so an Epistemic Head attaches to ``classifier`` (ViT, ConvNeXt: a Linear;
ResNet: the Linear inside ``Sequential(Flatten, Linear)``).

``bridge_from_processor`` turns the image processor's settings (``size``, ``crop_pct``, ``crop_size``,
``resample``, ``rescale_factor``, ``image_mean`` / ``image_std``) into a ``BridgeConfig``, so the differentiable
bridge reproduces the processor's preprocessing on decoded images; class names come from ``config.id2label``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from .bridge import BridgeConfig

PREFIX = "hf:"

# PIL resampling codes (transformers' PILImageResampling) -> the bridge's F.interpolate mode. Both transformers
# backends antialias when they shrink (PIL always; the torchvision backend passes antialias=True), as the bridge does.
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic", 4: "area"}
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def _transformers():
    """The transformers package, or ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf: classifiers need transformers: pip install 'longtail[sd]' (or transformers)") from err
    return transformers


def is_hf_spec(spec: str) -> bool:
    """True for ``hf:<dir>`` classifier specs."""
    return spec.startswith(PREFIX)


def hf_dir(spec: str) -> Path:
    """The directory of an ``hf:<dir>`` spec; ``FileNotFoundError`` naming it when it has no ``config.json``."""
    path = Path(spec[len(PREFIX) :]).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"classifier {spec}: {path} is not a Hugging Face model directory (no config.json; write one with "
            "model.save_pretrained(dir) and processor.save_pretrained(dir))"
        )
    return path


class HFImageClassifier(nn.Module):
    """A transformers image classification model as ``pixel_values [B, C, H, W] -> logits [B, num_labels]``.

    The wrapped model is ``self.model`` (state-dict keys ``model.<transformers key>``). ``get_classifier()`` returns
    the final ``nn.Linear`` of the model's ``classifier`` module, the layer an Epistemic Head copies.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, C, H, W]`` preprocessed images -> logits ``[B, num_labels]`` (the output object's ``.logits``)."""
        return self.model(pixel_values=pixel_values).logits

    def get_classifier(self) -> nn.Module:
        """The classification layer: ``model.classifier`` if a Linear, else the last Linear inside it
        (``ValueError`` naming the model class when there is none, e.g. ``num_labels=0``)."""
        head = getattr(self.model, "classifier", None)
        if isinstance(head, nn.Linear):
            return head
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
        if not linears:
            raise ValueError(f"{type(self.model).__name__} has no linear 'classifier' layer")
        return linears[-1]


def load_hf_classifier(spec: str, num_classes: int | None = None,
                       model_kwargs: Mapping | None = None) -> HFImageClassifier:
    """``AutoModelForImageClassification.from_pretrained(<dir>, local_files_only=True, **model_kwargs)``, wrapped.

    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``{"num_labels": 10, "ignore_mismatched_sizes": True}`` for a
    new, randomly initialised head of 10 classes on a pretrained backbone); nothing is downloaded
    (``local_files_only`` is forced) and ``weights_only=False`` is refused. Raises ``FileNotFoundError`` for a
    directory without ``config.json``, and ``ValueError`` in one line naming the directory when the weights do
    not load, when the classification layer's outputs differ from ``config.id2label``, or when ``num_classes``
    differs from the model's number of classes.
    """
    transformers = _transformers()
    hf_logging = transformers.utils.logging
    path = hf_dir(spec)
    kwargs = {**dict(model_kwargs or {}), "local_files_only": True}
    if kwargs.get("weights_only") is False:
        raise ValueError(f"classifier {spec}: weights_only=False is refused (weights load only through "
                         "safetensors or torch.load(weights_only=True))")
    if not kwargs.get("ignore_mismatched_sizes"):
        check_label_count(spec, path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"classifier {spec}: cannot load it as AutoModelForImageClassification "
                         f"({_label_count(path)}): {first}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    wrapped = HFImageClassifier(model)
    labels = len(model.config.id2label)
    try:
        outputs = wrapped.get_classifier().out_features
    except ValueError:  # no linear ``classifier`` (e.g. DeiT with a distillation token): the config says
        outputs = labels
    if outputs != labels:
        raise ValueError(f"classifier {spec}: its classification layer has {outputs} outputs but config.json "
                         f"id2label names {labels} classes")
    if num_classes is not None and num_classes != outputs:
        raise ValueError(
            f"classifier {spec} has {outputs} classes but num_classes={num_classes}; for a new head of "
            f"{num_classes} classes pass model_kwargs {{num_labels: {num_classes}, ignore_mismatched_sizes: true}}"
        )
    return wrapped


def check_label_count(spec: str, path: Path) -> None:
    """Before loading: the classes ``config.json`` names (``id2label``) against the outputs of the weights'
    classification layer (the one 2-D ``classifier*.weight`` tensor of ``model.safetensors``; nothing is checked
    when there is no such single tensor or file). ``ValueError`` in one line naming the directory, both numbers
    and the tensor."""
    from ..files import safetensors_shapes

    weights = path / "model.safetensors"
    try:
        id2label = json.loads((path / "config.json").read_text()).get("id2label")
    except (OSError, ValueError):
        return
    if not weights.is_file() or not id2label:
        return
    heads = [(k, shape) for k, shape in safetensors_shapes(weights, f"classifier {spec} weights").items()
             if k.startswith("classifier") and k.endswith("weight") and len(shape) == 2]
    if len(heads) == 1 and heads[0][1][0] != len(id2label):
        key, shape = heads[0]
        raise ValueError(f"classifier {spec}: config.json id2label names {len(id2label)} classes but {key} in "
                         f"{weights} has {shape[0]} outputs; make id2label list {shape[0]} names")


def _label_count(path: Path) -> str:
    """What ``config.json`` says about the classes, for error messages."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "config.json unreadable"
    if "id2label" in config:
        return f"config.json id2label names {len(config['id2label'])} classes"
    return f"config.json num_labels {config.get('num_labels', 'unset')}"


def hf_class_names(model: nn.Module) -> list[str] | None:
    """Class names from ``config.id2label`` in id order, or None when they are transformers' placeholders
    (``LABEL_0``, ``LABEL_1``, ...) or the model is not an ``HFImageClassifier``."""
    if not isinstance(model, HFImageClassifier):
        return None
    id2label = {int(k): str(v) for k, v in model.model.config.id2label.items()}
    names = [id2label[i] for i in sorted(id2label)]
    if all(_DEFAULT_LABEL.fullmatch(n) for n in names):
        return None
    return names


def _interpolation(resample: object) -> str:
    """PIL resampling code / enum / torchvision InterpolationMode -> an F.interpolate mode (``ValueError`` for
    lanczos / hamming, which F.interpolate lacks)."""
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        value = _RESAMPLE_NAMES.get(value.lower(), value)
    if value not in _RESAMPLE:
        raise ValueError(f"image processor resample {resample!r} has no differentiable equivalent in the bridge "
                         "(nearest, bilinear, bicubic, box are supported); pass classifier.preprocess")
    return _RESAMPLE[value]


def _size_dict(size: object) -> dict:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def bridge_from_processor(processor: object, in_channels: int | None = None) -> BridgeConfig:
    """A ``BridgeConfig`` equal to a transformers image processor's eval preprocessing.

    Resize: ``size = {height, width}`` exact; ``{shortest_edge}`` the shorter side (aspect kept). ConvNeXt's rule
    (a ``crop_pct`` attribute): for ``shortest_edge < 384`` resize the shorter side to ``int(shortest_edge /
    crop_pct)`` and center crop ``shortest_edge`` squared, else warp to ``shortest_edge`` squared. Then
    ``crop_size`` when ``do_center_crop``; transformers crops at ``floor((H - h) / 2)`` (``crop_offset="floor"``).
    Resizing is clamped per pass as the processors' 8-bit resizers do (``clamp_resize``).
    Scaling: a processor computes ``(pixel * rescale_factor - mean) / std`` on 0..255 pixels; the bridge
    normalises ``x`` in [0, 1], so mean and std are divided by ``255 * rescale_factor`` (exact for any factor;
    without ``do_normalize`` mean 0, std 1; without ``do_rescale`` the factor is 1). Raises ``ValueError`` for a
    size form the bridge cannot express (``longest_edge``, ``max_height``) or an unsupported ``resample``.
    """
    size = _size_dict(getattr(processor, "size", None)) if getattr(processor, "do_resize", False) else {}
    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    if set(size) - {"height", "width", "shortest_edge"}:
        raise ValueError(f"image processor size {size} is not supported by the bridge (height/width or "
                         "shortest_edge only); pass classifier.preprocess")
    if "shortest_edge" in size and getattr(processor, "crop_pct", None) is not None:  # ConvNeXt-style
        edge = int(size["shortest_edge"])
        if edge < 384:
            resize, crop = int(edge / float(processor.crop_pct)), (edge, edge)
        else:
            resize = crop = (edge, edge)
    elif "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif size:
        resize = crop = (int(size["height"]), int(size["width"]))
    if getattr(processor, "do_center_crop", False):
        crop_size = _size_dict(getattr(processor, "crop_size", None))
        if crop_size:
            crop = (int(crop_size["height"]), int(crop_size["width"]))
    factor = 255.0 * (float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0)
    if getattr(processor, "do_normalize", False):
        mean, std = tuple(float(m) for m in processor.image_mean), tuple(float(s) for s in processor.image_std)
    else:
        mean, std = (0.0,), (1.0,)
    return BridgeConfig(
        size=crop,
        resize=resize,
        mean=tuple(m / factor for m in mean),
        std=tuple(s / factor for s in std),
        interpolation=_interpolation(getattr(processor, "resample", 2)) if resize is not None else "bilinear",
        in_channels=in_channels,
        crop_offset="floor",
        clamp_resize=True,
        source=f"transformers {type(processor).__name__}",
    )


def hf_bridge(spec: str, model: nn.Module | None = None) -> BridgeConfig:
    """The bridge of an ``hf:<dir>`` classifier from ``<dir>/preprocessor_config.json`` (``AutoImageProcessor``,
    offline). Raises ``FileNotFoundError`` naming the file when it is missing (then pass ``preprocess``)."""
    path = hf_dir(spec)
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"classifier {spec}: no preprocessor_config.json in {path} (save the image processor there with "
            "processor.save_pretrained(dir), or give the preprocessing as classifier.preprocess)"
        )
    processor = _transformers().AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    channels = None
    if isinstance(model, HFImageClassifier):
        channels = getattr(model.model.config, "num_channels", None)
    return bridge_from_processor(processor, in_channels=channels)
