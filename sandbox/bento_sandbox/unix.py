"""Unix socket paths of any length: ``sun_path`` holds 107 bytes, and a data
dir's sockets (``sessions/<id>/ctl.sock``, ``sandbox.sock``) may be deeper."""

from __future__ import annotations

import os


class short_path:  # noqa: N801 - used as a function: ``with short_path(p) as short:``
    """``path`` as ``/proc/self/fd/N/<name>`` while the block runs (N: its
    directory, opened here), for ``bind`` or ``connect``. (A class, not
    contextlib's decorator: the exchange, which starts per session, does not
    import contextlib.)"""

    def __init__(self, path: str) -> None:
        self.path = path
        self.dir_fd = -1

    def __enter__(self) -> str:
        self.dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_PATH | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.dir_fd}/{os.path.basename(self.path)}"

    def __exit__(self, *_exc: object) -> None:
        os.close(self.dir_fd)
