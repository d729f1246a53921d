"""What the driver imports at its start (it runs in every environment, for as
long as its function does): the stdlib's C modules rather than their Python
wrappers, nothing for typing, nothing for a failure it may never have. Each
module listed here costs every environment memory and start-up time
(docs/performance.md); one that comes back is named in the failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).resolve().parents[2] / "driver"

# (threading, queue and signal bring enum, functools and collections: ~1 MiB;
# typing ~0.6 MiB; linecache and traceback bring tokenize and re.)
NOT_AT_START = ("threading", "queue", "signal", "enum", "functools", "collections", "typing",
                "linecache", "traceback", "re", "importlib", "types", "warnings")


def test_the_driver_starts_without_the_heavy_stdlib_modules():
    code = (f"import sys; sys.path.insert(0, {str(DRIVER)!r}); import bento_driver.main; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert "bento_driver.main" in out
    assert [m for m in NOT_AT_START if m in out] == []


def test_the_server_writes_the_drivers_bytecode_that_a_sandbox_could_not(tmp_path):
    # Inside bwrap the driver's package is read-only: what is not compiled
    # beforehand is compiled by every environment at its start.
    from bento.exchange_paths import compile_driver

    package = tmp_path / "bento_driver"
    package.mkdir()
    for source in (DRIVER / "bento_driver").glob("*.py"):
        (package / source.name).write_bytes(source.read_bytes())
    assert compile_driver(str(package))
    cached = {p.name.split(".")[0] for p in (package / "__pycache__").glob("*.pyc")}
    assert cached == {p.stem for p in package.glob("*.py")}
    assert "main" in cached and "waits" in cached
