"""Conversions between what people type or read and protocol values.

Pure functions, no I/O: limit specs (``wall=30s,mem=256M``), sizes and
durations, and the JSON form of protocol (CBOR) values. Used by the SDK (a
``limits=`` string), the CLI and the local state file.

JSON form of a CBOR value: JSON has no bytes and only text map keys, so
bytes become ``{"$base64": "<standard base64>"}``, and integer or bytes map
keys become text (``str(n)``, base64). ``from_json`` turns ``{"$base64": s}``
back into bytes, so values round-trip except for non-text map keys.
"""

from __future__ import annotations

import base64
from typing import Any

from bento import protocol
from bento.units import limit_value, parse_duration, parse_size

__all__ = [
    "LIMIT_ALIASES",
    "from_json",
    "parse_buffer",
    "parse_duration",
    "parse_limits",
    "parse_size",
    "to_json",
]

# Short names people type -> protocol limit keys (the protocol keys work too).
LIMIT_ALIASES: dict[str, str] = {
    "wall": "wall_s",
    "time": "wall_s",
    "cpu": "cpu_s",
    "mem": "memory_bytes",
    "memory": "memory_bytes",
    "out": "output_bytes",
    "output": "output_bytes",
    "pids": "pids",
    "procs": "pids",
    "file": "file_bytes",
    **{k: k for k in protocol.LIMIT_KEYS},
}

def parse_limits(spec: str | dict[str, Any] | None) -> dict[str, int | float]:
    """The protocol ``limits`` map for ``spec``.

    ``spec`` is text such as ``"wall=30s,mem=256M,cpu=10s,out=1M,pids=64"``
    (keys: wall, cpu, mem, out, pids, file or the protocol names wall_s,
    cpu_s, memory_bytes, output_bytes, pids, file_bytes; times take duration
    suffixes, byte counts size suffixes), or a map (its values may be such
    text too), or None. Raises ValueError naming the bad part."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"bad limit {part.strip()!r}: expected NAME=VALUE, e.g. wall=30s")
            items.append((key.strip(), value.strip()))
    out: dict[str, int | float] = {}
    for key, value in items:
        name = LIMIT_ALIASES.get(str(key).lower())
        if name is None:
            known = ", ".join(sorted({k for k in LIMIT_ALIASES if "_" not in k} | {"pids"}))
            raise ValueError(f"unknown limit {key!r} (known: {known})")
        if name in out:
            raise ValueError(f"limit {key!r} given twice")
        out[name] = limit_value(name, value)
    return out


def parse_buffer(max_bytes: int | str | None = None, policy: str | None = None) -> dict[str, Any] | None:
    """The protocol ``buffer`` map from a size (``64M`` or bytes) and a policy."""
    out: dict[str, Any] = {}
    if max_bytes is not None:
        out["max_bytes"] = parse_size(max_bytes) if isinstance(max_bytes, str) else int(max_bytes)
    if policy is not None:
        if policy not in protocol.BUFFER_POLICIES:
            raise ValueError(f"bad buffer policy {policy!r} (one of: {', '.join(sorted(protocol.BUFFER_POLICIES))})")
        out["policy"] = policy
    return out or None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bytes):
        return _b64(k)
    return str(k)


def to_json(value: Any) -> Any:
    """The JSON form of a protocol value (see the module docstring)."""
    if isinstance(value, bytes):
        return {"$base64": _b64(value)}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {_key(k): to_json(v) for k, v in value.items()}
    return value


def from_json(value: Any) -> Any:
    """A protocol value from its JSON form: ``{"$base64": s}`` becomes bytes."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$base64"), str):
            try:
                return base64.b64decode(value["$base64"], validate=True)
            except ValueError as exc:
                raise ValueError(f"bad base64 in {value!r}") from exc
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
