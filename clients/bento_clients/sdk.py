"""Bento's Python SDK: a trio-native async client that survives dropped connections.

    async with bento_clients.connect("ws://127.0.0.1:8765/v1", api_key=...) as c:
        s = await c.execute(code_or_function_id_or_callable, *args, **kwargs)
        async for frame in s.output():
            ...
        value = await s.result()

It speaks the wire protocol (docs/protocol.md) through ``bento.protocol``
only. The pieces, each in its own module:

- ``supervisor``: keeps one connection up (connect, ``hello``, reconnect with
  backoff and jitter, give up after ``reconnect_timeout``) and carries requests
  over it, re-sending those that are safe to repeat;
- ``link``: one WebSocket connection: whole messages, replies matched to
  requests, events routed;
- ``client``: the request API and the sessions attached on the connection,
  restored on each new link;
- ``session``, ``inputs``: one session's frames, acks, input and result;
- ``positions``, ``flow``: the pure bookkeeping (seqs, the input log, the
  bounded read queue and when to pause).

This module is the entry point: ``connect()`` and the public names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio

from bento_clients.client import DEFAULT_URL, RESERVED_OPTIONS, Client, default_url
from bento_clients.inputs import InputJournal
from bento_clients.session import Session
from bento_clients.supervisor import leaf_exceptions

__all__ = [
    "DEFAULT_URL",
    "RESERVED_OPTIONS",
    "Client",
    "InputJournal",
    "Session",
    "connect",
    "default_url",
    "leaf_exceptions",
]


def _raise_unwrapped(exc: BaseException) -> NoReturn:
    """Raise the single exception inside nested groups (the body's own exception),
    keeping its context; a real group is raised as is."""
    leaves = leaf_exceptions(exc)
    one = leaves[0] if len(leaves) == 1 else exc
    context = one.__context__
    try:
        raise one
    finally:
        one.__context__ = context
        del one, context


@asynccontextmanager
async def connect(
    url: str | None = None,
    api_key: str | None = None,
    *,
    reconnect_timeout: float = 60.0,
    connect_timeout: float = 10.0,
    ca_file: str | None = None,
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to a Bento server: ``async with connect(url, api_key=...) as client``.

    ``url`` defaults to ``$BENTO_SERVER`` or ``ws://127.0.0.1:8765/v1``;
    ``api_key`` to ``$BENTO_API_KEY``; ``ca_file`` (for ``wss://``: PEM
    certificates to trust besides the system's, e.g. a server's self-signed
    one) to ``$BENTO_CA_FILE``. The first connection is tried (with
    backoff) for ``connect_timeout`` seconds, then ``ConnectionLost``. A
    dropped connection is restored by itself (backoff with jitter) for up to
    ``reconnect_timeout`` seconds; each drop and each reconnect is logged at
    WARNING on the ``bento.client`` logger. Other options: ``ping_interval``,
    ``ping_timeout``, ``backoff_base``, ``backoff_max``,
    ``max_pending_inputs``, ``max_message``, ``max_queued_bytes`` (unread output
    per session past which its attachment pauses until read; see docs/sdk.md),
    ``ssl_context``, ``client_name``.

    Leaving the block acknowledges the frames read, closes the connection and
    detaches every session; the functions keep running.
    """
    client = Client(url, api_key, reconnect_timeout=reconnect_timeout,
                    connect_timeout=connect_timeout, ca_file=ca_file, **options)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await client._start(nursery)
                yield client
            finally:
                await client._shutdown()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_unwrapped(group)
