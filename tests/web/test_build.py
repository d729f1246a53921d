"""The committed page (bento/web/static/) is the build of its sources.

``clients/web/build.mjs`` writes BUILD: the sha256 of every source it read
(its own code, package.json, package-lock.json, src/*) and of every file it
wrote. Without Node, the hashes are checked here, so an edited source or lock
without `make web`, or a hand-edited asset, fails. With Node and npm, the build
runs again from a clean copy into a temporary directory and must give the same
bytes, and the page's rules run their JS unit tests (clients/web/test/).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

STATIC = os.path.join(ROOT, "bento", "web", "static")
WEB = os.path.join(ROOT, "clients", "web")


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_stamp(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """(sources, outputs) of a BUILD file: path -> sha256."""
    sources: dict[str, str] = {}
    outputs: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            kind, digest, name = line.split()
            {"source": sources, "output": outputs}[kind][name] = digest
    return sources, outputs


def current_sources() -> list[str]:
    src = sorted(os.listdir(os.path.join(WEB, "src")))
    return ["clients/web/build.mjs", "clients/web/package.json", "clients/web/package-lock.json",
            *(f"clients/web/src/{name}" for name in src)]


def test_stamp_matches_the_sources_and_the_committed_assets():
    sources, outputs = read_stamp(os.path.join(STATIC, "BUILD"))
    assert sorted(sources) == sorted(current_sources()), (
        "clients/web has files the last build did not read (or lost some): run `make web`")
    stale = [path for path, digest in sources.items() if sha256_of(os.path.join(ROOT, path)) != digest]
    assert stale == [], f"changed since the last build: {stale}; run `make web` and commit bento/web/static"
    assert sorted(outputs) == sorted(name for name in os.listdir(STATIC) if name != "BUILD")
    edited = [name for name, digest in outputs.items() if sha256_of(os.path.join(STATIC, name)) != digest]
    assert edited == [], f"bento/web/static/{edited} differ from the build: run `make web`, never edit them"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A clean copy of clients/web (no node_modules) with `npm ci` run in it, at
    clients/web under a temporary root, so the build's relative paths are the
    same as in the repository."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the rebuild and the JS unit tests need them "
                    "(the stamp check runs without)")
    root = tmp_path_factory.mktemp("web")
    web = root / "clients" / "web"
    shutil.copytree(WEB, web, ignore=shutil.ignore_patterns("node_modules"))
    npm_ci = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=web,
                            capture_output=True, text=True, timeout=240)
    assert npm_ci.returncode == 0, npm_ci.stderr[-3000:]
    return node, web


@pytest.mark.deadline(300)
def test_a_clean_rebuild_gives_the_committed_bytes(installed, tmp_path):
    node, web = installed
    out = tmp_path / "out"
    build = subprocess.run([node, "build.mjs", str(out)], cwd=web, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    built = sorted(os.listdir(out))
    assert built == sorted(os.listdir(STATIC))
    differ = [name for name in built
              if (out / name).read_bytes() != Path(STATIC, name).read_bytes()]
    assert differ == [], f"a rebuild differs from bento/web/static in {differ}: run `make web`"


@pytest.mark.deadline(300)
def test_the_page_rules_pass_their_js_unit_tests(installed):
    """clients/web/test/: the output tracker, input seqs, store bounds, CBOR, error texts."""
    node, web = installed
    run = subprocess.run([node, "--test", "test/"], cwd=web, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout, run.stdout[-2000:]
