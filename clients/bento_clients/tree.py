"""A local directory as an execute's ``files``: what is sent, what is left out, and the caps.

``pack(root)`` walks a project and returns {relative path: bytes}. It leaves
out what the top-level ``.gitignore`` names (its plain patterns; ``!``
negations are not supported and are skipped), the usual caches (``.git``,
``__pycache__``, ``*.pyc``, virtualenvs) and ``excludes``. A symlink whose
target is inside the tree is sent as the file it points to; one that points
out of the tree is an error (it would send a file from elsewhere). Over
``max_files`` or ``max_bytes`` is an error that names the biggest entries, so
the user knows what to ``--exclude``. Pure file reading: no network, no trio.
"""

from __future__ import annotations

import fnmatch
import os

__all__ = ["DEFAULT_EXCLUDES", "TreeError", "pack"]

DEFAULT_EXCLUDES = (".git", "__pycache__", "*.pyc", ".venv", "venv", ".mypy_cache", ".pytest_cache",
                    ".ruff_cache", ".tox", "*.egg-info")


class TreeError(ValueError):
    """The directory cannot be sent as it is; the message says why and what to do."""


def _gitignore(root: str) -> list[str]:
    try:
        with open(os.path.join(root, ".gitignore"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "!"))]


def _excluded(rel: str, is_dir: bool, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    for pat in patterns:
        if pat.endswith("/"):
            if not is_dir:
                continue
            pat = pat.rstrip("/")
        if "/" in pat:
            if fnmatch.fnmatchcase(rel, pat.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


def pack(root: str, excludes: tuple[str, ...] | list[str] = (), max_files: int = 10_000,
         max_bytes: int = 16 * 1024 * 1024 - 64 * 1024) -> dict[str, bytes]:
    """The files of ``root`` to send (see the module's docstring)."""
    if not os.path.isdir(root):
        raise TreeError(f"{root} is not a directory")
    top = os.path.realpath(root)
    patterns = [*DEFAULT_EXCLUDES, *_gitignore(root), *excludes]
    out: dict[str, bytes] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        base = os.path.relpath(dirpath, root)
        base = "" if base == "." else base + "/"
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if _excluded(base + d, True, patterns):
                continue
            if os.path.islink(full):
                _inside(top, full, base + d)
                continue  # its target is in the tree already
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = base + name
            full = os.path.join(dirpath, name)
            if _excluded(rel, False, patterns):
                continue
            if os.path.islink(full):
                _inside(top, full, rel)
            if not os.path.isfile(full):
                continue  # a FIFO, a socket: nothing to send
            with open(full, "rb") as f:
                out[rel] = f.read()
            total += len(out[rel])
            if len(out) > max_files:
                raise TreeError(f"{root} has more than {max_files} files to send: leave some out "
                                "with --exclude PATTERN (or .gitignore)")
    if total > max_bytes:
        biggest = sorted(out, key=lambda p: -len(out[p]))[:3]
        raise TreeError(f"{root} holds {total} bytes to send, more than {max_bytes}: the biggest are "
                        f"{', '.join(f'{p} ({len(out[p])})' for p in biggest)}; leave them out with "
                        "--exclude PATTERN, or fetch such data inside the function")
    return out


def _inside(top: str, path: str, rel: str) -> None:
    target = os.path.realpath(path)
    if target != top and not target.startswith(top + os.sep):
        raise TreeError(f"{rel} is a symlink out of the tree (to {target}): not sent; remove it or "
                        "--exclude it")
