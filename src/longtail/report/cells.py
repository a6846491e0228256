"""What templates render: table cells, tables and inlined images (formatting happens here, once)."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..evaluation.stats import mean_std

DASH = "–"


def fmt(value: object, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals (1 from 100 up), NaN / None as a dash, bools yes / no."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


@dataclass(frozen=True)
class Cell:
    """One table cell, right-aligned when ``num``; ``span`` wraps the text in ``<span class=...>``."""

    text: str
    num: bool = False
    span: str = ""


def num(text: str) -> Cell:
    """A pre-formatted number, right-aligned."""
    return Cell(text, num=True)


def numf(value: object, spec: str = ".1f") -> Cell:
    """A finite number formatted with ``spec``; anything else shows as a dash."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return num(format(value, spec) if ok else DASH)


def fmt_ms(values: Sequence[float | None]) -> Cell:
    """``mean ± std`` over seeds (just the mean for one seed), as a right-aligned cell."""
    return fmt_stat(mean_std(values))


def fmt_stat(stat: object) -> Cell:
    """A ``mean_std`` result (``{"mean", "std", "n"}``) as ``fmt_ms`` shows it; a dash when malformed."""
    if not isinstance(stat, dict):
        return num(DASH)
    mean, std, n = stat.get("mean"), stat.get("std"), stat.get("n")
    return num(f"{fmt(mean)} ± {fmt(std)}" if isinstance(n, int) and n > 1 and mean is not None else fmt(mean))


def fmt_duration(seconds: float) -> str:
    """Seconds as ``42.0 s``, ``20 min 44 s`` or ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min {whole % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def mean_of(values: Sequence[float | None]) -> float | None:
    """The mean of the finite values, ``None`` when there are none."""
    return mean_std(values)["mean"]


@dataclass
class Table:
    """Headers and rows; strings stay left-aligned text, other values become right-aligned ``fmt`` cells."""

    headers: Sequence[str]
    rows: list[list[Cell]] = field(default_factory=list)
    cls: str = ""

    def __post_init__(self) -> None:
        self.rows = [[cell(v) for v in row] for row in self.rows]


def cell(value: object) -> Cell:
    """Cells stay, strings become text cells, anything else a right-aligned ``fmt`` cell."""
    return value if isinstance(value, Cell) else Cell(value) if isinstance(value, str) else num(fmt(value))


@dataclass(frozen=True)
class Image:
    """An inlined PNG: ``uri`` is a ``data:image/png;base64`` URI."""

    uri: str
    alt: str
    cls: str = ""


def image(png: bytes, alt: str, cls: str = "") -> Image:
    """``png`` inlined as a ``data:`` URI; raises ``ValueError`` if it is no PNG."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG image")
    return Image("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt, cls)


def shrink_png(png: bytes, max_side: int = 1600) -> bytes:
    """The PNG itself, or a downscaled copy when its longer side exceeds ``max_side`` (keeps pages light)."""
    from PIL import Image as PILImage

    img = PILImage.open(io.BytesIO(png))
    if max(img.size) <= max_side:
        return png
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def json_text(data: object, limit: int = 20_000) -> str:
    """Indented JSON for a ``<pre>``, cut at ``limit`` characters."""
    text = json.dumps(data, indent=2, default=str)
    return text[:limit] + "\n… (truncated)" if len(text) > limit else text
