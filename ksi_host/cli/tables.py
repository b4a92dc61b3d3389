"""Plain-text tables and durations for the CLI."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..errors import ValidationError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``24h``, ``30m``, ``7d``, ``2w``, ``90s`` (ago) or an ISO date/time -> unix seconds."""
    if text is None:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError("--since", f"expected a duration like 24h, 30m, 7d or an ISO date, got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def money(value: float) -> str:
    """US dollars rounded to what matters: cents from $1 up, else at most four significant digits (0.0001215)."""
    import math

    if value == 0 or abs(value) >= 1:
        return f"{value:,.2f}"
    decimals = min(12, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def fmt(value: Any, key: str = "") -> str:
    """A cell or a value for people: ``-`` for None, thousands separators, money (keys with ``cost``) rounded."""
    if value is None:
        return "-"
    if isinstance(value, float) and "cost" in key:
        return money(value)
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Characters that drive a terminal rather than show: C0 and C1 controls but tab and newline (escape
sequences: colours, clearing the screen, setting the title, OSC 8 links) and the bidirectional overrides."""


def printable(text: str) -> str:
    """``text`` with each of :data:`_CONTROLS` spelt out (``\\x1b``, ``\\u202e``): what a request, an upstream
    or a model wrote is shown, it cannot drive the terminal of whoever reads it."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class Printable:
    """A text stream that writes to ``stream`` through :func:`printable` (for ``print(..., file=...)``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(printable(text))

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


ELLIPSIS = "\u2026"


def cut(text: str, width: int | None) -> str:
    """``text`` cut to ``width`` characters, the last one an ellipsis when something was left out."""
    if width is None or len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS


def terminal_width() -> int | None:
    """The terminal's columns when stdout is one (or ``$COLUMNS`` when set), else None: no limit."""
    import os
    import shutil
    import sys

    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


MIN_TEXT_COLUMN = 8
"""A text column narrowed to fit the terminal keeps at least this many characters (or its heading's)."""


def _fit(widths: list[int], headings: Sequence[str], numeric: Sequence[bool], width: int) -> list[int]:
    """Column widths that fit ``width`` (with two spaces between columns): the widest text column gives way first."""
    widths = list(widths)
    floor = [w if num else min(w, max(len(h), MIN_TEXT_COLUMN)) for w, h, num in zip(widths, headings, numeric, strict=True)]
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    while excess > 0:
        i = max(range(len(widths)), key=lambda j: widths[j] - floor[j])
        room = widths[i] - floor[i]
        if room <= 0:
            break  # numbers and headings are not cut: the line stays wider
        give = min(room, excess)
        widths[i] -= give
        excess -= give
    return widths


def render(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], width: int | None = None,
           missing: dict[str, str] | None = None) -> str:
    """A table of ``rows`` with ``columns`` given as (key, heading); numbers right-aligned.

    With ``width``, text columns are narrowed (widest first) until a line fits, and cells cut with an
    ellipsis. ``missing`` gives a column's text for None (default ``-``).
    """
    missing = missing or {}
    cells = [[missing.get(k, "-") if r.get(k) is None else fmt(r.get(k), k) for k, _ in columns] for r in rows]
    headings = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headings)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _ in columns]
    if width is not None:
        widths = _fit(widths, headings, numeric, width)

    def line(values: Sequence[str]) -> str:
        return "  ".join(cut(v, w).rjust(w) if num else cut(v, w).ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(headings), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)
