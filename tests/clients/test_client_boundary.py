"""The import arrows of docs/architecture.md, checked on the source: the clients
stand on the wire protocol and nothing else of the server."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the clients may import of the ``bento`` package: the protocol, the
# package root (for its ``__version__``), tcptune, a stdlib-only helper that
# both sides use and that knows nothing of either, and units, the one parser
# of sizes and durations (pure functions over the protocol's limit keys).
ALLOWED = {"bento", "bento.protocol", "bento.tcptune", "bento.units"}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names
    (``from bento import x`` counts as ``bento.x`` when x is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    found.add(f"{node.module}.{alias.name}")
    return found


def test_clients_import_only_the_protocol_of_the_server():
    files = sorted((ROOT / "clients" / "bento_clients").glob("*.py"))
    assert len(files) > 10
    wrong = {
        f"{path.name}: {module}"
        for path in files
        for module in imported_modules(path)
        if (module == "bento" or module.startswith("bento.")) and module not in ALLOWED
    }
    assert not wrong, sorted(wrong)


def test_the_server_package_root_does_not_import_the_clients():
    assert not [m for m in imported_modules(ROOT / "bento" / "__init__.py") if m.startswith("bento_clients")]


def test_the_checker_sees_the_imports_it_must_refuse(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import bento.auth\nfrom bento import config, protocol\nfrom bento.sessions import x\n")
    assert imported_modules(sample) >= {"bento.auth", "bento.config", "bento.protocol", "bento.sessions"}
