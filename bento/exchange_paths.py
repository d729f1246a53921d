"""Where an exchange and a driver find their code, and the driver's bytecode.

The server starts exchanges with ``python -I -S`` and a ``sys.path`` of its
own making (no site, no environment variables): these say which directories
that path holds, and which one a sandbox binds for the driver.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import bento_driver
import bento_sandbox

import bento


def _parents(*modules: Any) -> list[str]:
    dirs: list[str] = []
    for mod in modules:
        d = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__ or "")))
        if d not in dirs:
            dirs.append(d)
    return dirs


def exchange_sys_path() -> list[str]:
    """Where the exchange finds bento, the sandbox backends and the driver's wire (it runs with -I -S)."""
    return _parents(bento, bento_sandbox, bento_driver)


def driver_sys_path() -> list[str]:
    """Where the driver (stdlib and its own codec) is found. bwrap binds only
    the driver's package from there (bento/launch.py), so nothing else of the
    host's packages is importable in the sandbox (never the data dir)."""
    return _parents(bento_driver)


def real_python() -> str:
    return os.path.realpath(sys.executable)


def compile_driver(package: str) -> bool:
    """Write the bytecode of the driver's package (``package``, a directory)
    next to its source; False if some could not be written. A sandbox binds
    the package read-only and the exchange imports only part of it, so without
    this each environment compiles the rest at its start, every time
    (docs/performance.md)."""
    import compileall  # (once, at the server's start)

    return bool(compileall.compile_dir(package, maxlevels=0, quiet=2))
