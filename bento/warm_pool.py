"""The warm pool: exchanges started with their environment before any session.

A mixin of ``bento.exchanges.Exchanges`` (which starts the processes): it keeps
as many warm exchanges ready as bento/pool_sizing.py says for the recent
executes, hands one to a new session (``take_warm``, ``assign_warm``), and
refills after a take once that session's first output is in. The exchange's
side of the handshake is bento/warm.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from bento import protocol, warm
from bento.config import session_limits
from bento.exchange_link import SPAWN_TIMEOUT_S, ExchangeGone, ExchangeLink

if TYPE_CHECKING:
    from bento import pool_sizing
    from bento.sandbox_template import SandboxTemplate
    from bento.template_link import Template

log = logging.getLogger("bento.sessions")

# A warm exchange answers within its own bound for the environment to come up, plus its start.
WARM_TIMEOUT_S = warm.UP_TIMEOUT_S + 10.0
RETRY_FIRST_S = 1.0  # the warm pool's pause after a failure, doubled while failures go on
RETRY_MAX_S = 30.0
SIZING_TICK_S = 1.0  # the pool's target is looked at again at least this often (to shrink it)
# After a take, warm starts wait until the session's first output has reached the
# server (its exchange's first message after the hello) and OUT_ROOM_S more for
# the out event to reach the client: at most TAKE_GRACE_S in all.
TAKE_GRACE_S = 0.05
OUT_ROOM_S = 0.003


class WarmPool:
    """Keeps warm exchanges ready and hands them to new sessions."""

    if TYPE_CHECKING:  # what bento.exchanges.Exchanges provides
        config: Any
        nursery: trio.Nursery
        python: str
        driver_path: list[str]
        envs_dir: str
        warm: list[ExchangeLink]
        warm_dir: str
        warm_wanted: trio.Event
        pool_size: int
        sizing: pool_sizing.PoolSizing
        parallel: int
        starting: int
        pause: float
        retry_at: float
        failing: bool
        taken_at: float
        first_hops: trio.Event
        template: Template | None
        sandbox_template: SandboxTemplate

        async def _start_template(self) -> None: ...

        async def _start_warm_process(self) -> tuple[socket.socket, int, Callable[[], None]]: ...

    async def pool_keeper(self) -> None:
        """Keep warm exchanges ready, as many as bento/pool_sizing.py says for the
        recent executes (bwrap: the sandbox's home is a directory of its own until
        a session takes it; none: the driver moves to the session's work dir when
        it starts; so nothing ties them to a session yet). Up to one start per
        core runs at once: one at a time could not keep up with a few executes a
        second. A warm exchange that fails or is slow is logged with why and the
        next start waits a pause that doubles while they keep failing (one at a
        time meanwhile): executes start cold then, and the keeper never ends.
        Beyond the target (the executes slowed down), the oldest are closed."""
        if self.template is not None:
            # Ready before executes come fast (its start is the exchange's imports, ~50 ms).
            self.nursery.start_soon(self._start_template)
        if self.sandbox_template.on:
            self.nursery.start_soon(self.sandbox_template.run)
            await self.sandbox_template.settled.wait()  # (tens of ms: else the first ones start bwraps)
        async with trio.open_nursery() as starts:
            while self.pool_size:
                now = trio.current_time()
                wanted = self.sizing.target(now)
                while len(self.warm) > wanted:
                    self.close_warm(self.warm.pop(0))
                if now < self.retry_at:
                    await self._wake_within(self.retry_at - now)
                    continue
                at_once = 1 if self.failing else self.parallel
                while len(self.warm) + self.starting < wanted and self.starting < at_once:
                    self.starting += 1
                    starts.start_soon(self._start_one)
                # A take, a start that ended, or the window's slide (for shrinking).
                await self._wake_within(SIZING_TICK_S)
                # Let the session that just took a warm exchange have the CPU first
                # (the sizing counts TAKE_GRACE_S as part of a replacement's start).
                with trio.move_on_at(self.taken_at + TAKE_GRACE_S):
                    await self.first_hops.wait()
                    await trio.sleep(OUT_ROOM_S)

    def warm_limits(self) -> dict | None:
        """What a warm environment puts on before its session comes, so that the
        server may send its start (bento/launch.py, send_start: bwrap only): the
        limits of a session that asks for none. None: nothing (not bwrap, or
        such a session is refused anyway)."""
        if self.config.sandbox != "bwrap":
            return None
        try:
            return session_limits(self.config, {})
        except protocol.RequestError:
            return None

    async def _wake_within(self, seconds: float) -> None:
        self.warm_wanted = trio.Event()
        with trio.move_on_after(seconds):
            await self.warm_wanted.wait()

    async def _start_one(self) -> None:
        began = trio.current_time()
        try:
            link = await self._spawn_warm()
        except Exception as exc:  # a bug here must not end the pool nor the server
            if isinstance(exc, (OSError, RuntimeError, ExchangeGone)):
                log.error("warm pool: could not start a warm environment: %s (next try in %g s)",
                          exc, self.pause)
            else:
                log.exception("warm pool: could not start a warm environment (next try in %g s)", self.pause)
            self.retry_at = trio.current_time() + self.pause
            self.pause = min(2 * self.pause, RETRY_MAX_S)
            self.failing = True
        else:
            self.warm.append(link)
            # From a take to its replacement: this start and the pause before it.
            self.sizing.started(trio.current_time() - began + TAKE_GRACE_S)
            self.pause, self.retry_at, self.failing = RETRY_FIRST_S, 0.0, False
        finally:
            self.starting -= 1
            self.warm_wanted.set()

    def close_warm(self, link: ExchangeLink) -> None:
        """A warm exchange not wanted (or taken for a session that could not be made): it sees
        its link end, discards its environment and exits; its directory goes too, if still its."""
        self.nursery.start_soon(link.stream.aclose)
        if link.home:
            self.discard_dir(link.home)

    def discard_dir(self, path: str) -> None:
        """Remove a directory a warm exchange had (gone by the next start, if a
        process still writes in it: moved into warm/ first)."""
        aside = os.path.join(self.warm_dir, f"discarded-{os.urandom(6).hex()}")
        try:
            os.rename(path, aside)
        except OSError:
            aside = path
        shutil.rmtree(aside, ignore_errors=True)

    async def _spawn_warm(self) -> ExchangeLink:
        """A warm exchange whose environment is up (bento/warm.py says why up)."""
        # Prepared by the exchange as a session's (its ``work`` is the home); a session renames it.
        home = tempfile.mkdtemp(prefix="warm-", dir=self.warm_dir)
        try:
            os.mkdir(os.path.join(home, "work"), 0o755)
            ours, pid, kill = await self._start_warm_process()
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
        link = ExchangeLink(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        ready: dict | None = None
        fork = self.sandbox_template.path
        limits = self.warm_limits()
        try:
            await link.send({
                "t": "warm", "sandbox": self.config.sandbox, "sandbox_cmd": self.config.sandbox_cmd,
                "python": self.python, "driver_path": self.driver_path, "network": False,
                "envs_dir": self.envs_dir, "dir": home, **({"fork": fork} if fork else {}),
                **({"limits": limits, "allow_unenforced": self.config.allow_unenforced_limits}
                   if limits is not None else {}),
            })
            with trio.move_on_after(WARM_TIMEOUT_S) as waited:
                ready = await link.receive()
            if waited.cancelled_caught:
                # Stuck past its own bound for the environment: it will not answer.
                kill()
                raise RuntimeError(f"the warm exchange (pid {pid}) did not answer within "
                                   f"{WARM_TIMEOUT_S:g} s and was killed")
            if ready is None or ready.get("t") != "warm_ready":
                raise RuntimeError(f"the warm exchange (pid {pid}) ended without answering: {ready!r:.200}")
            if ready["error"]:
                raise RuntimeError(ready["error"])
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)  # (first: a cancelled aclose raises)
            await link.stream.aclose()  # the exchange sees the end and exits, if it still runs
            raise
        link.home, link.kill = home, kill
        if ready.get("rlimits") is not None:
            link.limits, link.rlimits = limits, ready["rlimits"]
        return link

    def take_warm(self, network: bool) -> ExchangeLink | None:
        """A warm exchange out of the pool for a new session (its directory, ``link.home``,
        becomes the session's: ``Store.create_session``), or None if none fits or is ready."""
        if network and self.config.sandbox == "bwrap":
            return None
        if self.pool_size:
            self.sizing.executed(trio.current_time())  # (also when none is ready: the pool grows)
            self.warm_wanted.set()
        if not self.warm:
            return None
        self.taken_at = trio.current_time()
        link = self.warm.pop(0)
        link.taken = self.first_hops = trio.Event()
        return link

    async def assign_warm(self, link: ExchangeLink, sdir: str, started: bool, meta_cbor: bytes) -> dict | None:
        """Hand the session in ``sdir`` to its warm exchange (``started``: its
        driver has its start already; ``meta_cbor``: its meta.cbor, sent along when
        small, so that the exchange need not read it): its hello, or None
        (gone, too slow)."""
        msg = {"t": "assign", "dir": sdir, **({"started": True} if started else {}),
               **({"meta": meta_cbor} if len(meta_cbor) <= warm.INLINE_META_MAX else {})}
        try:
            await link.send(msg)
            with trio.fail_after(SPAWN_TIMEOUT_S):
                return await link.hello()
        except (ExchangeGone, trio.TooSlowError):
            if link.kill is not None:
                link.kill()  # (a slow one must not go on with the session: it holds its lock)
            await link.stream.aclose()
            return None
