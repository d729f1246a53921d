"""Bento clients: the Python SDK (``sdk``, async; ``sync``, blocking), the local
state file (``state``) and the ``bento`` CLI (``cli``).

Importing this package is cheap (no trio): the names below are loaded on
first use, like those ``bento`` itself exposes (``bento.connect``,
``bento.sync``, ``bento.RemoteError``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute or None for the module itself)
EXPORTS: dict[str, tuple[str, str | None]] = {
    "connect": ("bento_clients.sdk", "connect"),
    "Client": ("bento_clients.sdk", "Client"),
    "Session": ("bento_clients.sdk", "Session"),
    "sync": ("bento_clients.sync", None),
    **{name: ("bento_clients.frames", name) for name in ("Stdout", "Stderr", "Msg", "Gap", "Exit", "EOF")},
    **{
        name: ("bento_clients.errors", name)
        for name in (
            "BentoError", "ConnectionLost", "RequestInterrupted", "RequestFailed", "Unauthorized",
            "Forbidden", "NotFound", "Conflict", "Gone", "SessionGone", "InputClosed", "RemoteError",
            "SessionKilled", "SessionFailed", "SessionLost",
        )
    },
}

__all__ = sorted(EXPORTS)


def load(name: str) -> Any:
    """The object exported as ``name`` (imports its module on first use)."""
    module, attr = EXPORTS[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'bento_clients' has no attribute {name!r}")
    value = load(name)
    globals()[name] = value
    return value
