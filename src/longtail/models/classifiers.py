"""Load the user's classifier: architecture by name, weights from a checkpoint, optional Epistemic Head.

``spec`` picks the architecture:

* a torchvision name (``resnet50``), built with random weights (nothing is downloaded);
* ``timm:<name>`` (``timm:vit_base_patch16_224``), likewise;
* ``hf:<dir>``: a Hugging Face ``AutoModelForImageClassification`` saved with ``save_pretrained`` in a local
  directory, with its weights (``models.hf``: offline; the module returns the logits tensor; class names from
  ``id2label``; the preprocessing from the image processor saved beside it);
* a Python entry point ``package.module:function`` or ``path/to/file.py:function`` returning an ``nn.Module``
  (called with ``num_classes=`` when given and the function accepts it, plus ``model_kwargs``).

Weights come from ``checkpoint``: ``.safetensors`` through safetensors, anything else through
``torch.load(weights_only=True)`` (state dicts only, never pickled code). A ``{"state_dict": ...}`` /
``{"model": ...}`` wrapper is unwrapped and ``module.`` / ``model.`` / ``_orig_mod.`` prefixes are stripped
when every key carries them. Missing or unexpected keys are an error that lists them.

The preprocessing the classifier expects (``BridgeConfig``) is resolved at load time: timm's data config, the
default weights' transforms of a torchvision architecture, a Hugging Face image processor
(``preprocessor_config.json``), or ``preprocess`` given explicitly.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import files
from ..data.imagefolder import read_class_names
from ..heads import EpistemicClassifier, find_head
from . import hf
from .bridge import BridgeConfig, BridgedClassifier, ClassifierBridge

STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class LoadedClassifier:
    """A loaded classifier (an ``EpistemicClassifier`` when heads were given), class names, preprocessing."""

    model: nn.Module
    class_names: list[str] | None
    bridge: BridgeConfig
    spec: str
    num_classes: int | None = None
    checkpoint: str | None = None
    heads: str | None = None

    def info(self) -> dict:
        """JSON-ready summary (for the resolved config written next to outputs)."""
        return {
            "spec": self.spec,
            "num_classes": self.num_classes,
            "checkpoint": self.checkpoint,
            "heads": self.heads,
            "class_names": self.class_names,
            "bridge": self.bridge.to_dict(),
        }


def classifier_bridge(loaded: LoadedClassifier) -> ClassifierBridge:
    """The differentiable decoder -> classifier preprocessing of a loaded classifier."""
    return ClassifierBridge(loaded.bridge).to(_device(loaded.model))


def bridged_classifier(loaded: LoadedClassifier) -> BridgedClassifier:
    """``classifier(bridge(x))`` for decoded images in [-1, 1]: what ``generate(classifier=...)`` takes."""
    return BridgedClassifier(classifier_bridge(loaded), loaded.model)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --- architectures ------------------------------------------------------------------------------------------


def _call_factory(fn: object, name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    if not callable(fn):
        raise TypeError(f"entry point {name} is not callable")
    kw = dict(kwargs)
    if num_classes is not None:
        params = inspect.signature(fn).parameters
        if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kw["num_classes"] = num_classes
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise TypeError(f"entry point {name} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_entry_point(spec: str) -> object:
    """``module:function`` or ``file.py:function`` -> the function (a dotted attribute path is allowed)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(
            f"entry point {spec!r} must look like 'module:function' or 'path/to/file.py:function'"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"entry point file {path} does not exist")
        name = f"longtail_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ImportError(f"cannot import {target!r} for entry point {spec!r}: {err}") from err
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{target} has no attribute {attr!r} (entry point {spec!r})")
        obj = getattr(obj, part)
    return obj


def build_model(spec: str, num_classes: int | None = None, model_kwargs: Mapping | None = None) -> nn.Module:
    """The architecture of ``spec`` with random weights, or for ``hf:<dir>`` with the directory's weights (see
    the module docstring for the forms; ``models.hf.load_hf_classifier`` for the errors of ``hf:``)."""
    kwargs = dict(model_kwargs or {})
    if hf.is_hf_spec(spec):
        return hf.load_hf_classifier(spec, num_classes, kwargs)
    if spec.startswith("timm:"):
        import timm

        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(spec[5:], pretrained=False, **kwargs)
    if ":" in spec:
        return _call_factory(_load_entry_point(spec), spec, num_classes, kwargs)
    import torchvision

    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return torchvision.models.get_model(spec, weights=None, **kwargs)
    except ValueError as err:
        raise ValueError(
            f"unknown classifier {spec!r}: not a torchvision model ({err}); use 'timm:<name>' for timm "
            "models or 'module:function' / 'file.py:function' for your own"
        ) from None


def default_bridge(spec: str, model: nn.Module) -> BridgeConfig:
    """The preprocessing a model expects: timm's data config, torchvision's default weights' transforms, a
    Hugging Face image processor (``hf:<dir>``, ``models.hf.hf_bridge``), else the decoder's images as they are
    (``BridgeConfig()``, channels taken from the first convolution)."""
    if hf.is_hf_spec(spec):
        return hf.hf_bridge(spec, model)
    if spec.startswith("timm:") or getattr(model, "pretrained_cfg", None):
        return BridgeConfig.from_timm(model)
    if ":" not in spec:
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(spec).DEFAULT
        except (ValueError, KeyError, AttributeError):
            weights = None
        if weights is not None:
            return BridgeConfig.from_torchvision(weights, in_channels=input_channels(model) or 3)
    return BridgeConfig(in_channels=input_channels(model), source="identity (decoder range, no resize)")


def input_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (None for models without one)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


# --- checkpoints --------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a classifier checkpoint (``longtail.files.read_state_dict``: safetensors or
    ``torch.load(weights_only=True)``, wrappers unwrapped); ``FileNotFoundError`` / ``WeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return files.read_state_dict(path, "classifier checkpoint")


def strip_prefixes(state: Mapping[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Drop ``module.`` / ``model.`` / ``_orig_mod.`` (repeatedly) while every key has one the model lacks; add
    ``model.`` when every model key has it and no checkpoint key does (a bare transformers state dict, e.g. a
    ``model.safetensors`` of ``save_pretrained``, for an ``hf:`` classifier)."""
    state = dict(state)
    if (state and model_keys and all(k.startswith("model.") for k in model_keys)
            and not any(k.startswith("model.") for k in state)):
        return {f"model.{k}": v for k, v in state.items()}
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load a checkpoint into ``model``; returns ``{"missing": [...], "unexpected": [...]}``.

    With ``strict`` any missing or unexpected key raises ``ValueError`` listing them (first 20 of each);
    a shape mismatch raises naming the tensor and both shapes.
    """
    model_state = model.state_dict()
    state = strip_prefixes(read_state_dict(path), set(model_state))
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and v.shape != model_state[k].shape
    ]
    if shapes:
        raise ValueError(f"{path}: shape mismatch for {len(shapes)} tensors: " + "; ".join(shapes[:10]))
    result = model.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if strict and (report["missing"] or report["unexpected"]):
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {len(report['missing'])} missing keys "
            f"{report['missing'][:20]}, {len(report['unexpected'])} unexpected keys "
            f"{report['unexpected'][:20]} "
            "(wrong architecture or num_classes? pass strict=False to load what matches)"
        )
    return report


# --- the one entry point ------------------------------------------------------------------------------------


def _head_count(path: Path) -> int | None:
    meta = files.safetensors_metadata(path, "Epistemic Head weights")
    return int(meta["num_heads"]) if "num_heads" in meta else None


def load_classifier(
    spec: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    heads: str | Path | None = None,
    num_heads: int | None = None,
    head_name: str | None = None,
    class_names_file: str | Path | None = None,
    preprocess: BridgeConfig | Mapping | None = None,
    model_kwargs: Mapping | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedClassifier:
    """Build ``spec``, load ``checkpoint``, attach Epistemic Head weights ``heads``; eval mode on ``device``.

    ``num_heads`` defaults to the head file's metadata (else 5). ``class_names_file`` must list as many names
    as the classifier has outputs; without it an ``hf:`` classifier's names are its ``id2label``. ``preprocess``
    overrides the resolved ``BridgeConfig`` (a dict works). Without a checkpoint the weights are random (tests;
    an ``hf:`` directory brings its own); real use passes one. Parameters stay trainable (the sampler freezes
    the classifier for the duration of a call).
    """
    model = build_model(spec, num_classes, model_kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict)
    try:
        _, head = find_head(model, head_name)
        outputs: int | None = head.out_features
    except ValueError:
        if heads is not None:
            raise
        outputs = num_classes
    if heads is not None:
        heads = Path(heads)
        if not heads.is_file():
            raise FileNotFoundError(f"no Epistemic Head file at {heads}")
        k = num_heads or _head_count(heads) or 5
        model = EpistemicClassifier(model, num_heads=k, head_name=head_name)
        model.load_heads(heads)
    names = read_class_names(class_names_file) if class_names_file is not None else None
    if names is None:
        names = hf.hf_class_names(model.base if isinstance(model, EpistemicClassifier) else model)
    if names is not None and outputs is not None and len(names) != outputs:
        raise ValueError(
            f"{class_names_file} lists {len(names)} class names but the classifier has {outputs} outputs"
        )
    base = model.base if isinstance(model, EpistemicClassifier) else model
    if preprocess is None:
        bridge = default_bridge(spec, base)
    elif isinstance(preprocess, BridgeConfig):
        bridge = preprocess
    else:
        bridge = BridgeConfig.from_dict(preprocess)
    if bridge.in_channels is None and input_channels(base) is not None:
        bridge = replace(bridge, in_channels=input_channels(base))  # e.g. an RGB classifier on a grayscale decoder
    model = model.to(device).eval()
    return LoadedClassifier(
        model=model,
        class_names=names,
        bridge=bridge,
        spec=spec,
        num_classes=outputs,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        heads=str(heads) if heads is not None else None,
    )
