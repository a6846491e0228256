"""File helpers for every job: strict JSON (atomic writes, tolerant reads) and the one weights loader.

JSON is RFC 8259: no NaN or infinity. An undefined figure is written as ``null`` (numpy and torch scalars are
converted first), so any strict parser reads every file the tool writes.

Weights are read only by :func:`load_checkpoint`: safetensors, or ``torch.load(weights_only=True)`` (tensors
and plain containers, never pickled code). A file it cannot read raises one ``WeightsError`` naming the file
and what to do, whatever the underlying unpickler or safetensors error was.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

# --- JSON ---------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars and zero-dimensional torch tensors as Python numbers; anything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    return value


def finite(value: Any) -> Any:
    """``value`` as JSON-ready data: non-finite floats become ``None``, numpy / torch scalars Python numbers
    (nested dicts, lists and tuples included)."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def to_json(data: Any, indent: int | None = 2, **kwargs: Any) -> str:
    """``data`` as strict JSON text (RFC 8259: NaN / infinity -> ``null``); ``kwargs`` go to ``json.dumps``."""
    return json.dumps(finite(data), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as strict JSON (``to_json``) to a temporary name, then rename it into place.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(to_json(data))
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> Any:
    """The parsed file, or ``None`` when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def check_run_marker(marker: Path, settings: Mapping[str, Any], started: bool, what: str, way_out: str) -> None:
    """Resume guard of a training run: when ``started``, refuse (ValueError naming the keys that differ) a
    ``marker`` file written with other ``settings``, or no marker at all; then record ``settings`` there.
    ``what`` names the run ("a LoRA training run"), ``way_out`` ends the message ("use another --out")."""
    wanted = json.loads(to_json(settings, indent=None, sort_keys=True))
    if started:
        if not marker.is_file():
            raise ValueError(f"{marker.parent} holds {what} of other settings (no {marker.name}); {way_out}")
        old = json.loads(marker.read_text())
        changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        if changed:
            raise ValueError(f"{marker.parent} holds {what} begun with other settings ({', '.join(changed)} "
                             f"differ); {way_out}, or the same settings to resume")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(to_json(wanted, indent=None, sort_keys=True))


# --- weights ------------------------------------------------------------------------------------------------

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
RESAVE_HINT = ("only tensors are loaded, never pickled objects: load it where you trust its source and re-save "
               "its weights with torch.save(model.state_dict(), path) or safetensors.torch.save_file")


class WeightsError(ValueError):
    """A weights file could not be read as tensors; the message names the file and what to do."""


def _cause(err: BaseException) -> str:
    """The informative part of a loader's error: torch's unpickler buries it after ``WeightsUnpickler error:``
    in a page of advice (some of which, re-loading with ``weights_only=False``, this tool never takes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first.split('. ')[0].rstrip('.')}"


def _refused(what: str, path: Path, reader: str, err: BaseException) -> WeightsError:
    """One clear error for whatever ``reader`` raised: the file, the cause in one line, the fix."""
    return WeightsError(f"{what} {path} could not be read with {reader} ({_cause(err)}); {RESAVE_HINT}")


def load_checkpoint(path: str | Path, what: str = "weights file") -> dict[str, Any]:
    """The top-level mapping of a weights file: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)`` on the CPU. ``what`` names the file's role in errors.

    Raises ``FileNotFoundError`` when there is no file, ``WeightsError`` when it cannot be read (a pickled
    module the safe unpickler refuses, a corrupt file) or holds no mapping at its top level.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    safetensors = path.suffix == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's and safetensors' errors vary with what they refused
        raise _refused(what, path, "safetensors" if safetensors else "torch.load(weights_only=True)", err) from err
    if not isinstance(state, Mapping):
        raise WeightsError(f"{what} {path} holds a {type(state).__name__}, not a state dict; {RESAVE_HINT}")
    return dict(state)


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a weights file (``load_checkpoint``), ``{"state_dict": ...}``-style wrappers unwrapped.

    Raises ``WeightsError`` naming the file when what is left is not a mapping of names to tensors.
    """
    from torch import Tensor

    state: Any = load_checkpoint(path, what)
    while isinstance(state, Mapping):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{what} {path} is not a state dict of tensors ({bad[:5]} are not tensors); "
                           f"{RESAVE_HINT}")
    return dict(state)


def safetensors_metadata(path: str | Path, what: str = "weights file") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none); ``WeightsError`` if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise _refused(what, path, "safetensors", err) from err


def safetensors_shapes(path: str | Path, what: str = "weights file") -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file, from its header only (no tensor is read); ``WeightsError`` if
    unreadable, ``FileNotFoundError`` when there is no file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as err:
        raise _refused(what, path, "safetensors", err) from err
