"""Bento: a detachable function-execution server.

This package's import must stay cheap: the exchange (one process per session)
imports ``bento.protocol`` through it, so nothing here may import trio or any
other heavy module at import time.
"""

__version__ = "0.1.0"
