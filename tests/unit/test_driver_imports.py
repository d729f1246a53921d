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

