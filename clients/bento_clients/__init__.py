"""Bento clients: the Python SDK (``sdk``, async; ``sync``, blocking), the local
state file (``state``) and the ``bento`` CLI (``cli``).

This package is the SDK's public import::

    import bento_clients

    async with bento_clients.connect(url) as c: ...      # trio
    with bento_clients.sync.connect(url) as c: ...       # blocking

Importing it is cheap (no trio): the names below are loaded on first use, so
``bento_clients.RemoteError`` can be caught without loading the SDK. Of the
server package the clients import only the wire protocol (``bento.protocol``,
with the package's ``__version__``) and the neutral ``bento.tcptune``; the
server never imports them.
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
    **{name: ("bento_clients.frames", name) for name in ("Stdout", "Stderr", "Msg", "Gap", "Exit", "EOF",
                                                             "Stdin")},
    **{
        name: ("bento_clients.errors", name)
        for name in (
            "BentoError", "ConnectionLost", "RequestInterrupted", "RequestFailed", "Unauthorized",
            "Forbidden", "NotFound", "Conflict", "Gone", "SessionGone", "InputClosed", "RemoteError",
            "SessionKilled", "SessionFailed", "SessionLost", "TooLarge", "Busy", "QuotaExceeded",
            "Unavailable",
        )
    },
}

__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    """The object exported as ``name``, its module imported on first use."""
    if name not in EXPORTS:
        raise AttributeError(f"module 'bento_clients' has no attribute {name!r}")
    module, attr = EXPORTS[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
