"""The size rule of the code (issue 10): no file over 500 lines, no class over 300.

Read with ``ast`` from the source of the server, the driver, the sandbox and
the clients; a file or class over its bound is named in the failure, so a
change that grows one past it is split before it lands.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIRS = ("bento", "driver", "sandbox", "clients")
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300


def oversized(name: str, text: str) -> list[str]:
    """What in one file's source is over its bound, one line each."""
    found = []
    lines = len(text.splitlines())
    if lines > MAX_FILE_LINES:
        found.append(f"{name}: {lines} lines (at most {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(text, filename=name)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > MAX_CLASS_LINES:
                found.append(f"{name}:{node.lineno}: class {node.name} is {size} lines "
                             f"(at most {MAX_CLASS_LINES})")
    return found


def sources() -> list[Path]:
    paths = []
    for d in DIRS:
        paths += [p for p in (ROOT / d).rglob("*.py")
                  if not any(part.startswith(".") or part == "node_modules" for part in p.parts)]
    return sorted(paths)


def test_the_walk_finds_each_part_of_the_code() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in sources()}
    for path in ("bento/server.py", "bento/exchange.py", "driver/bento_driver/main.py",
                 "sandbox/bento_sandbox/__init__.py", "clients/bento_clients/client.py"):
        assert path in found


def test_no_file_or_class_is_over_its_bound() -> None:
    found = []
    for path in sources():
        found += oversized(path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))
    assert not found, "split these (no file over 500 lines, no class over 300):\n" + "\n".join(found)


def test_the_check_names_a_long_file_and_a_long_class() -> None:
    method = "    def m(self) -> None:\n        pass\n"
    long_class = "class Big:\n" + method * 150  # 301 lines
    assert oversized("x.py", long_class) == ["x.py:1: class Big is 301 lines (at most 300)"]
    assert oversized("x.py", "class Small:\n" + method * 149) == []
    assert oversized("y.py", "x = 1\n" * 501) == ["y.py: 501 lines (at most 500)"]
    assert oversized("y.py", "x = 1\n" * 500) == []
