"""Sizes and durations as people write them: ``512MiB``, ``1G``, ``4k``, ``1.5m``, ``2h``.

One parser for the server's options, its config file and the clients. Pure
functions, no I/O; every error is a ValueError that names the bad text and
shows what would be accepted.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from bento import protocol

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_LIMITS = ("wall_s", "cpu_s")


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``1048576``, ``64K``, ``256M``, ``1.5G``, ``256MiB``, ``2gb``.

    Suffixes are binary (K = 1024) and case-insensitive. Raises ValueError."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 4096, 64K, 256M, 512MiB, 1G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``30``, ``30s``, ``500ms``, ``2m``, ``1.5h``, ``1d``. Raises ValueError."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r} (examples: 30s, 500ms, 2m, 1.5h, 1d)")
    value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    if not math.isfinite(value):
        raise ValueError(f"bad duration {text!r}")
    return int(value) if value.is_integer() else value


def size(value: str | int | float) -> int:
    """A byte count from an option or config value (text with a suffix, or an int)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"bad size {value!r} (examples: 4096, 64K, 256M, 512MiB, 1G)")
    if isinstance(value, int) and value >= 0:
        return value
    return parse_size(str(value))


def duration(value: str | int | float) -> float:
    """Seconds from an option or config value (text with a suffix, or a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"bad duration {value!r} (examples: 30s, 500ms, 2m, 1.5h, 1d)")
    if isinstance(value, str):
        return parse_duration(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad duration {value!r}: a non-negative number of seconds")
    return value


class BadCount(argparse.ArgumentTypeError, ValueError):
    """A whole number out of its option's range (argparse shows this message as it is)."""


def count(least: int, most: int | None = None) -> Callable[[str | int], int]:
    """An option's type: a whole number from ``least`` to ``most`` (the same check
    for the command line and the config file)."""

    def check(value: str | int) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadCount(f"must be a whole number, not {value!r}")
        try:
            n = int(value)
        except ValueError:
            raise BadCount(f"must be a whole number, not {value!r}") from None
        if n < least or (most is not None and n > most):
            raise BadCount(f"must be at least {least}" + ("" if most is None else f" and at most {most}")
                             + f", not {n}")
        return n

    check.__name__ = f"whole number >= {least}"  # (argparse names the type so in its message)
    return check


def limit_text(key: str, value: float) -> str:
    """Limit ``key``'s value as people write it: ``24h``, ``1GiB``, ``256``
    (exact: the largest unit that divides it)."""
    if key in DURATION_LIMITS:
        for unit in ("d", "h", "m", "s"):
            if value >= _DURATION_UNITS[unit] and (value / _DURATION_UNITS[unit]).is_integer():
                return f"{value / _DURATION_UNITS[unit]:g}{unit}"
        return f"{value:g}s"
    if key == "pids":
        return f"{value:g}"
    for unit in ("t", "g", "m", "k"):
        if value >= _SIZE_UNITS[unit] and value % _SIZE_UNITS[unit] == 0:
            return f"{int(value) // _SIZE_UNITS[unit]}{unit.upper()}iB"
    return f"{int(value)}B"


def limit_value(key: str, value: str | int | float) -> int | float:
    """The protocol value of limit ``key`` (a ``protocol.LIMIT_KEYS`` name) given as
    text or a number: durations for ``wall_s``/``cpu_s``, a whole number for
    ``pids``, sizes for the byte limits. Raises ValueError naming the limit."""
    try:
        if key in DURATION_LIMITS:
            return duration(value)
        if key == "pids":
            if isinstance(value, bool) or not str(value).strip().isdigit():
                raise ValueError(f"{value!r} is not a whole number")
            return int(str(value).strip())
        if key not in protocol.LIMIT_KEYS:
            raise ValueError(f"not a limit (known: {', '.join(sorted(protocol.LIMIT_KEYS))})")
        if isinstance(value, float) and math.isfinite(value) and value >= 0:
            return int(value)
        return size(value)
    except ValueError as exc:
        raise ValueError(f"limit {key}: {exc}") from None
