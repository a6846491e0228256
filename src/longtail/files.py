"""Run-directory file helpers: atomic JSON writes and tolerant reads (one implementation for every job)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats become ``None`` (nested containers included)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as strict JSON (NaN -> null) to a temporary name, then rename it into place.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> Any:
    """The parsed file, or ``None`` when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
