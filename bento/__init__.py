"""Bento: a detachable function-execution server.

This package's import must stay cheap: the exchange (one process per session)
imports ``bento.protocol`` through it, so nothing here may import trio or any
other heavy module at import time.
"""

__version__ = "0.1.0"


# The client API that ``bento`` exposes lazily (the same names as
# ``bento_clients.EXPORTS``; a test keeps the two equal). The set is checked
# before anything is imported: ``from bento import protocol`` asks this module
# for "protocol" first, and the exchange runs where bento_clients is not even
# on the path.
CLIENT_NAMES = frozenset({
    "connect", "Client", "Session", "sync", "Stdout", "Stderr", "Msg", "Gap", "Exit", "EOF",
    "BentoError", "ConnectionLost", "RequestInterrupted", "RequestFailed", "Unauthorized",
    "Forbidden", "NotFound", "Conflict", "Gone", "SessionGone", "InputClosed", "RemoteError",
    "SessionKilled", "SessionFailed", "SessionLost",
})


def __getattr__(name: str) -> object:
    """The client API, loaded on first use: ``bento.connect`` (async SDK),
    ``bento.sync`` (blocking facade), ``bento.RemoteError``, ``bento.ConnectionLost``,
    the frame types ... (``CLIENT_NAMES``)."""
    if name not in CLIENT_NAMES:
        raise AttributeError(f"module 'bento' has no attribute {name!r}")
    import bento_clients

    value = bento_clients.load(name)
    globals()[name] = value
    return value
