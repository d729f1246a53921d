"""Bento: a detachable function-execution server.

This package is the server and the wire protocol (``bento.protocol``), which
the clients (``bento_clients``: the SDK and the CLI) and the exchange stand
on. It never imports the clients: the SDK's public import is
``bento_clients`` (``bento_clients.connect``, ``bento_clients.sync``, ...).

Importing it must stay cheap: the exchange (one process per session) imports
``bento.protocol`` through it, so nothing here may import trio or any other
heavy module.
"""

__version__ = "0.1.0"
