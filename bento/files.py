"""A session's files: the tree an execute sends, and reading and writing its work dir.

Paths come from clients and the work dir is written by the function, so
nothing here trusts either: ``check_path`` and ``check_tree`` (pure) refuse
absolute paths, ``..``, empty or over-long components and trees over their
caps, with a message that says which rule; the I/O helpers walk a path one
component at a time from the work dir with ``O_NOFOLLOW`` (a symlink the
function made, even one to ``/etc/shadow``, is never followed on the host)
and touch only regular files and directories (a FIFO cannot block the
server). They raise ``FileError`` (a clear message for the client) or
OSError.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_FILES = 10_000
MAX_PATH_CHARS = 1024
MAX_DEPTH = 32
CHUNK = 1 << 20  # a file_get reply's data at most


class FileError(ValueError):
    """A path or a tree a client may not use, or a file that is not there; the
    message says why, ``code`` is the protocol's error code for it."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def check_path(path: str) -> list[str]:
    """The components of a client's relative path (``a/b.txt``); FileError for
    anything that could leave the work dir or is not a plain name."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
        raise FileError(f"a path is text of 1 to {MAX_PATH_CHARS} characters: {path!r:.80}")
    if path.startswith("/"):
        raise FileError(f"{path!r} is absolute: paths are relative to the session's work dir")
    if "\0" in path or "\\" in path:
        raise FileError(f"{path!r} holds a NUL or a backslash")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise FileError(f"{path!r} names the work dir itself, not a file in it")
    if ".." in parts:
        raise FileError(f"{path!r} goes up with '..': paths stay inside the session's work dir")
    if len(parts) > MAX_DEPTH or any(len(p.encode()) > 255 for p in parts):
        raise FileError(f"{path!r} is nested deeper than {MAX_DEPTH} or has a name over 255 bytes")
    return parts


def check_tree(files: dict, max_bytes: int) -> dict[tuple[str, ...], bytes]:
    """An execute's ``files`` (path -> bytes), checked: at most MAX_FILES files and
    ``max_bytes`` bytes, no path both a file and a directory."""
    if len(files) > MAX_FILES:
        raise FileError(f"{len(files)} files, more than {MAX_FILES}")
    total = sum(len(v) for v in files.values())
    if total > max_bytes:
        raise FileError(f"the files take {total} bytes, more than this server's {max_bytes}")
    tree = {tuple(check_path(p)): data for p, data in files.items()}
    if len(tree) != len(files):
        raise FileError("two paths name the same file")
    dirs = {parts[:i] for parts in tree for i in range(1, len(parts))}
    clash = dirs & tree.keys()
    if clash:
        raise FileError(f"{'/'.join(min(clash))!r} is both a file and a directory")
    return tree


def _walk(root: str, parts: list[str], create: bool) -> int:
    """An fd of the directory that holds ``parts[-1]`` (no symlink followed)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise FileError(f"no directory {name!r} in the session's work dir", "not_found") from None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise FileError(f"{name!r} is not a directory (symlinks are not followed)") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(exc: OSError) -> str:
    return "it is a symlink (not followed)" if exc.errno == errno.ELOOP else str(exc.strerror)


def write_tree(root: str, tree: dict[tuple[str, ...], bytes]) -> None:
    """Write a checked tree under ``root`` (which exists)."""
    for parts, data in tree.items():
        write_file(root, list(parts), 0, data, truncate=True)


def write_file(root: str, parts: list[str], offset: int, data: bytes, truncate: bool) -> int:
    """Write ``data`` at ``offset`` of a regular file (made with its directories
    if missing; truncated first when ``truncate``); returns the file's size."""
    dfd = _walk(root, parts, create=True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_TRUNC if truncate else 0)
        try:
            fd = os.open(parts[-1], flags, 0o644, dir_fd=dfd)
        except OSError as exc:
            raise FileError(f"cannot write {'/'.join(parts)!r}: {_why(exc)}") from None
    finally:
        os.close(dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileError(f"{'/'.join(parts)!r} is not a regular file")
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_file(root: str, parts: list[str], offset: int, size: int) -> tuple[bytes, int]:
    """(up to ``size`` bytes from ``offset``, the file's size) of a regular file."""
    dfd = _walk(root, parts, create=False)
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except FileNotFoundError:
            raise FileError(f"no file {'/'.join(parts)!r} in the session's work dir", "not_found") from None
        except OSError as exc:
            raise FileError(f"cannot read {'/'.join(parts)!r}: {_why(exc)}") from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{'/'.join(parts)!r} is not a regular file")
        return os.pread(fd, size, offset), st.st_size
    finally:
        os.close(fd)
