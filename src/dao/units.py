"""Sizes and durations as people write and read them: ``50GiB``, ``500MB``, ``1h30m``, ``7d``.

Kept free of heavy imports: every command parses or prints these, and start-up time is part of each run.
"""

from __future__ import annotations

import re

from dao.errors import USAGE, DaoError

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?")


class UnitError(DaoError, ValueError):
    """Not a size or not a duration; the message shows what would be."""

    exit_code = USAGE


def parse_size(text: str) -> int:
    """``10GiB``, ``500MB``, ``1.5T``, ``0`` -> bytes (``K``/``M``/``G`` are decimal, ``Ki``/``Mi``/``Gi`` binary)."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or (match[3] and not match[2]):
        raise UnitError(f"not a size: {text!r} (examples: 50GiB, 500MB, 0 for none)")
    power = "kmgtp".index(match[2]) + 1 if match[2] else 0
    return int(float(match[1]) * (1024 if match[3] else 1000) ** power)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``1h30m``, ``7d``, ``2w``, ``0`` -> seconds."""
    text = text.strip().lower()
    if text in ("0", "0s"):
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UnitError(f"not a duration: {text!r} (examples: 30m, 1h, 7d, 0)")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"
