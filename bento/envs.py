"""Environments: the packages an execute asks for, installed once per distinct spec.

An execute's ``packages`` (``["numpy", "pandas<3"]``) are checked and
normalised here (``normalise``); their hash names the environment's directory
under the data dir, ``envs/<hash>/``, where ``site/`` holds the installed
packages (a ``--target`` install: the driver adds it with
``site.addsitedir``) and ``ready.json`` says it is complete (specs, bytes).
The installer runs outside the sandbox, with network: this module's ``main``,
as a process of its own that the session's exchange starts and whose output
becomes the session's stderr frames. It takes the spec's lock, so two
executes of one spec build once (the second waits, then finds it ready);
after a build it evicts the least recently used environments over the size
cap. An exchange that uses an environment holds a shared lock on its
``ready.json`` (``use``), and eviction skips those.

It imports only the stdlib (the exchange imports it); it never installs
anything that is not a plain requirement on a package index: a spec is a
name with optional extras and version clauses, never an option, a path or a
URL.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

SITE = "site"
READY = "ready.json"
MAX_SPECS = 64
MAX_SPEC_CHARS = 200
DEFAULT_MAX_ENV_BYTES = 4 * 1024 * 1024 * 1024

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_VERSION = r"(?:===|==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_SPEC = rf"({_NAME})\s*(\[\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\])?\s*({_VERSION}(?:\s*,\s*{_VERSION})*)?"


class SpecError(ValueError):
    """A ``packages`` entry that is not a plain requirement (the message says why)."""


def normalise(packages: list[str]) -> list[str]:
    """The canonical form of a ``packages`` list: each spec's name lower-cased with
    runs of ``-_.`` as ``-``, no spaces, sorted, without duplicates. Raises
    SpecError for anything but ``name[extras] <version clauses>``."""
    import re  # (here: every exchange imports this module)

    if len(packages) > MAX_SPECS:
        raise SpecError(f"at most {MAX_SPECS} packages, not {len(packages)}")
    out = set()
    for spec in packages:
        if not isinstance(spec, str) or not 0 < len(spec) <= MAX_SPEC_CHARS:
            raise SpecError(f"a package spec is text of 1 to {MAX_SPEC_CHARS} characters: {spec!r:.80}")
        m = re.fullmatch(_SPEC, spec.strip())
        if m is None:
            raise SpecError(
                f"{spec!r} is not a package requirement: give a name with optional [extras] and "
                "version clauses, like 'pandas<3' or 'requests[socks]>=2,<3' (no options, paths, "
                "URLs or markers)")
        name, extras, versions = m.groups()
        name = re.sub(r"[-_.]+", "-", name).lower()
        extras = "" if not extras else "[" + ",".join(sorted(
            re.sub(r"[-_.]+", "-", e.strip()).lower() for e in extras[1:-1].split(","))) + "]"
        versions = ",".join(sorted(v.replace(" ", "") for v in (versions or "").split(",") if v.strip()))
        out.add(name + extras + versions)
    return sorted(out)


def env_hash(specs: list[str], python: str) -> str:
    """The name of the environment of ``specs`` (normalised) for this interpreter."""
    import hashlib
    import json

    version = ".".join(map(str, sys.version_info[:2]))
    text = json.dumps({"specs": specs, "python": python, "version": version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def use(envs_dir: str, name: str) -> int | None:
    """Take a shared lock on a ready environment for as long as the returned fd
    stays open (eviction passes it by), and mark it used now; None if it is not
    ready (or is being evicted)."""
    path = os.path.join(envs_dir, name, READY)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if not os.path.exists(path):  # evicted between the open and the lock
            raise OSError("gone")
        os.utime(path)
    except OSError:
        os.close(fd)
        return None
    return fd


def listing(envs_dir: str) -> list[dict]:
    """Every ready environment: name, specs, bytes, last_used (epoch s), in_use."""
    import json

    out = []
    try:
        names = sorted(os.listdir(envs_dir))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(envs_dir, name, READY)
        try:
            with open(path) as f:
                info = json.load(f)
                busy = not _lock_nb(f.fileno())
            last = os.stat(path).st_mtime
        except (OSError, ValueError):
            continue
        out.append({"name": name, "specs": info.get("specs", []), "bytes": int(info.get("bytes", 0)),
                    "last_used": last, "in_use": busy})
    return out


def _lock_nb(fd: int) -> bool:
    """Take the exclusive lock now (released when the fd closes); False if a session holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove(envs_dir: str, name: str) -> bool:
    """Delete environment ``name`` unless a session uses it; False if it is in use.
    Raises FileNotFoundError if there is no such environment."""
    import shutil

    path = os.path.join(envs_dir, name, READY)
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _lock_nb(fd):
            return False
        os.unlink(path)  # first: use() then finds it gone
        trash = os.path.join(envs_dir, f".trash-{name}-{os.getpid()}")
        os.rename(os.path.join(envs_dir, name), trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def evict(envs_dir: str, max_bytes: int, keep: str) -> list[str]:
    """Remove the least recently used environments (never ``keep``, never one in
    use) until they hold at most ``max_bytes`` together; returns the names removed."""
    envs = sorted(listing(envs_dir), key=lambda e: e["last_used"])
    total = sum(e["bytes"] for e in envs)
    gone = []
    for e in envs:
        if total <= max_bytes:
            break
        if e["name"] == keep or e["in_use"]:
            continue
        try:
            if remove(envs_dir, e["name"]):
                total -= e["bytes"]
                gone.append(e["name"])
        except OSError:
            continue
    return gone


def tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _say(text: str) -> None:
    sys.stderr.write(f"bento: {text}\n")
    sys.stderr.flush()


def build(envs_dir: str, name: str, specs: list[str], python: str, uv: str | None,
          max_bytes: int) -> int:
    """Install ``specs`` as environment ``name`` unless it is ready; returns the
    process exit code (0: ready). Progress and the installer's own output go to
    stderr (the exchange makes them the session's stderr frames)."""
    import shutil
    import subprocess

    os.makedirs(envs_dir, exist_ok=True)
    lock = os.open(os.path.join(envs_dir, f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        _say("waiting for another build of the same packages")
        fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(os.path.join(envs_dir, name, READY)):
        _say("packages ready (built by another session)")
        return 0
    tmp = os.path.join(envs_dir, f".build-{name}")
    shutil.rmtree(tmp, ignore_errors=True)  # a build that was killed (we hold its lock)
    tool = "uv" if uv else "pip"
    _say(f"installing {', '.join(specs)} with {tool}")
    started = time.monotonic()
    if uv:
        # Compiled at install, as pip does: the sandbox mounts the environment
        # read-only, so a module without its .pyc is compiled at every import.
        cmd = [uv, "pip", "install", "--no-cache", "--compile-bytecode", "--python", python,
               "--target", os.path.join(tmp, SITE), "--", *specs]
    else:
        cmd = [python, "-m", "pip", "install", "--no-input", "--no-cache-dir", "--disable-pip-version-check",
               "--target", os.path.join(tmp, SITE), "--", *specs]
    # Output unbuffered to our stderr (the session's stderr frames), stdin closed.
    rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
    if rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        _say(f"{tool} could not install {', '.join(specs)} (exit code {rc}); see its message above")
        return 1
    size = tree_bytes(tmp)
    if size > max_bytes:
        shutil.rmtree(tmp, ignore_errors=True)
        _say(f"the packages take {size} bytes, more than this server's --max-env-bytes ({max_bytes})")
        return 1
    import json

    with open(os.path.join(tmp, READY), "w") as f:
        json.dump({"specs": specs, "bytes": size, "python": python, "built": time.time()}, f)
    os.rename(tmp, os.path.join(envs_dir, name))
    _say(f"packages ready ({size // 1024} KiB in {time.monotonic() - started:.1f} s)")
    glock = os.open(os.path.join(envs_dir, ".evict.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(glock, fcntl.LOCK_EX)
    for gone in evict(envs_dir, max_bytes, keep=name):
        _say(f"removed the least recently used environment {gone} (over --max-env-bytes)")
    return 0


def main(argv: list[str]) -> None:
    """``envs_dir name python uv-or-'' max_bytes spec...``: see ``build``."""
    envs_dir, name, python, uv, max_bytes, *specs = argv
    sys.exit(build(envs_dir, name, specs, python, uv or None, int(max_bytes)))
