"""Whether the server can take sessions now, for ``GET /readyz``.

Ready means: the data dir takes a write (a small file written, synced and
removed), the configured sandbox backend is there, and in cluster mode the
node's last heartbeat reached Redis. Checked at most every CHECK_EVERY_S, in a
thread, so probes cost the server next to nothing.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Callable

import bento_sandbox
import trio

from bento.config import Config

CHECK_EVERY_S = 1.0


class Readiness:
    def __init__(self, config: Config, cluster: Callable[[], str | None] = lambda: None) -> None:
        self.config = config
        self.cluster = cluster  # why the cluster's store is out of reach (None: it is not)
        self._last: tuple[float, str | None] = (-math.inf, None)

    async def why_not(self) -> str | None:
        """Why this server cannot take sessions (None: it can)."""
        unreachable = self.cluster()
        if unreachable is not None:
            return unreachable
        at, why = self._last
        now = trio.current_time()
        if now - at >= CHECK_EVERY_S:
            why = await trio.to_thread.run_sync(self.check)
            self._last = (now, why)
        return why

    def check(self) -> str | None:
        data_dir = self.config.data_dir
        try:
            with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".ready-") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            return f"the data dir {data_dir} cannot be written: {os.strerror(exc.errno or errno.EIO)}"
        try:
            bento_sandbox.get_backend(self.config.sandbox, self.config.sandbox_cmd)
        except bento_sandbox.SandboxUnavailable as exc:
            return f"sandbox {self.config.sandbox}: {exc}"
        return None
