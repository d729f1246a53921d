"""One session's output log and snapshot, copied into Redis by the node that runs it.

The mirror reads the session's output log as an attachment would (by seq, up
to what the exchange has announced) and adds each frame to the session's
stream with the id ``<seq>-0``, in batches: one pipeline per batch carries the
frames and the snapshot that covers them (its ``next_seq`` is what the stream
holds, never more), and trims the stream below the session's ``first_seq``
(the buffer policy's drops, or acked frames trimmed by the history limit).
Frames dropped or trimmed before the mirror reached them are not copied:
readers see a gap, as on the node itself. The same pipeline carries a new version of the shared state
(the session's state stream keeps the latest version only: ``state`` events
carry the current value, docs/protocol.md §shared state) and the limits in
force once the exchange has said them.

What the mirror has not copied yet is lost to other nodes if this node dies:
the mirror runs as far behind as one batch plus one Redis round trip while
Redis keeps up (``behind`` records the most frames it found waiting).

It never writes to the log or talks to the exchange; when Redis cannot be
reached it waits and carries on from where it was.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import coredis
import trio
from coredis.exceptions import RedisError, ResponseError

from bento import protocol, sessionlog
from bento.cluster import keys
from bento.exchange_link import ExchangeGone
from bento.session_core import Snapshot

if TYPE_CHECKING:
    from bento.cluster.node import Cluster
    from bento.sessions import Session

log = logging.getLogger("bento.cluster.mirror")

BATCH_BYTES = 1024 * 1024
BATCH_FRAMES = 512
MAX_REFUSED = 2  # writes refused in a row before the mirror gives up
TRIMMED_WAIT_S = 0.05  # frames trimmed under the mirror: the next snapshot says how far


class Ended(Exception):
    """The cluster ended the session (its node was taken for dead): nothing more is written."""


class Mirror:
    """Copies one session into Redis until the session is removed."""

    def __init__(self, cluster: Cluster, s: Session) -> None:
        self.cluster = cluster
        self.redis = cluster.redis
        self.session = s
        self.published = False
        self.sent: Snapshot | None = None  # the last snapshot written to Redis
        self.state_sent = 0  # the shared state's version in Redis (read again with ``sent``)
        self.enforced_sent: dict | None = None  # the limits in force as written to Redis
        self.trimmed_below = 1
        self.frames = 0
        self.behind = 0  # the most frames found waiting at the start of a batch

    async def publish(self) -> None:
        lost = await self.cluster.enter(self.session)
        self.published = True
        # A session found at this node's start may have been ended by the
        # cluster while the node was away: that is known before it is served.
        if lost:
            await self.take_verdict()

    async def run(self) -> None:
        s = self.session
        cursor = sessionlog.Cursor(s.dir, "out", 1)
        backoff = 0.1
        refused = 0
        ended = False  # the cluster ended it: take its end, write nothing more
        try:
            while s.verdict is None:
                try:
                    if ended:
                        if not await self.take_verdict():
                            break  # its keys are gone
                        continue
                    if not await self._round(cursor):
                        break
                    backoff, refused = 0.1, 0
                except Ended:
                    ended = True
                except ResponseError as exc:
                    refused += 1
                    if refused > MAX_REFUSED:
                        log.error("session %s: Redis refused the mirror's write %d times (%s): were "
                                  "the session's keys changed by hand? Its output is no longer "
                                  "mirrored", s.sid, refused, exc)
                        break
                    # A batch that landed although its connection broke before the answer:
                    # carry on after the stream's last frame.
                    log.warning("session %s: Redis refused a batch (%s); going on after the "
                                "stream's last frame", s.sid, exc)
                    self.sent = None
                except RedisError as exc:
                    log.warning("session %s: cannot mirror into Redis: %s (again in %.1f s)",
                                s.sid, exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            cursor.close()
        log.info("session %s: mirrored %d frames, at most %d behind", s.sid, self.frames, self.behind)
        if s.verdict is not None:
            # Its keys in Redis are the session now: kept until it is removed here.
            while not s.removed:
                await s.changed.wait()
            backoff = 0.1
            while True:
                try:
                    await self.cluster.forget(s)
                    return
                except RedisError as exc:
                    log.warning("session %s: cannot remove its keys from Redis: %s (again in %.1f s)",
                                s.sid, exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def take_verdict(self) -> bool:
        """The cluster ended this session while this node was out of reach
        (bento/cluster/lost.py): that end stands here too. The node serves the
        session from Redis as every other node does (its attachments here go
        on from there, bento/server_attach.py), and stops its function if it
        still runs (every other node calls it lost). False if its keys are gone."""
        s = self.session
        if s.verdict is not None:
            return True
        raw = await self.redis.hget(keys.meta(s.sid), "lost")
        if raw is None:
            return False
        s.verdict = Snapshot.from_map(protocol.decode(raw))
        log.warning("session %s: the cluster ended it lost while this node was out of reach (at seq %s); "
                    "it is served from the cluster's copy%s", s.sid, s.verdict.exit_seq,
                    "" if s.snap.has_ended else ", and its function is stopped")
        s.notify()
        if not s.snap.has_ended and s.link is not None:
            try:
                await self.cluster.registry.call(s, {"t": "signal", "signal": "KILL"})
            except ExchangeGone:
                pass  # it ended meanwhile: nothing left to stop
        return True

    async def _round(self, cursor: sessionlog.Cursor) -> bool:
        """One batch into Redis, or a wait for news; False once the session is gone."""
        s = self.session
        changed = s.changed
        if s.removed:
            await self.cluster.forget(s)
            return False
        if not self.published:
            await self.publish()
        if self.sent is None:
            # After a restart of this node the stream has a head start: go on after it.
            top = await self.redis.xrevrange(keys.out(s.sid), count=1)
            if top:
                cursor.seek(keys.seq_of(top[0].identifier) + 1)
            # Likewise the state: a version is added once (its entry id is the version).
            top = await self.redis.xrevrange(keys.state(s.sid), count=1)
            self.state_sent = keys.seq_of(top[0].identifier) if top else 0
        snap = s.snap
        if cursor.next_seq < snap.first_seq:
            cursor.seek(snap.first_seq)
        start = cursor.next_seq
        frames: list[memoryview] = []
        if start < snap.next_seq:
            try:
                frames = cursor.read(snap.next_seq, BATCH_BYTES, BATCH_FRAMES)
            except FileNotFoundError:
                cursor.seek(start)
                with trio.move_on_after(TRIMMED_WAIT_S):
                    await changed.wait()
                return True
            except sessionlog.LogCorrupt as exc:
                log.error("session %s: output log is corrupt, mirror stops at seq %d: %s", s.sid, start, exc)
                return False
            self.behind = max(self.behind, snap.next_seq - start)
        covered = snap._replace(next_seq=cursor.next_seq)
        state = (s.shared_version, s.shared_value) if s.shared_version > self.state_sent else None
        enforced = s.enforced if s.enforced != self.enforced_sent else None
        if not frames and covered == self.sent and state is None and enforced is None:
            await changed.wait()
            return True
        try:
            await self._write(start, frames, covered, state, enforced)
        except BaseException:
            cursor.seek(start)  # not written (or not known to be): read it again next time
            raise
        return True

    async def _write(self, start: int, frames: list[memoryview], covered: Snapshot,
                     state: tuple[int, bytes] | None, enforced: dict | None) -> None:
        meta: dict[str, bytes] = {"snap": protocol.encode(covered._asdict())}
        if enforced is not None:
            meta["enforced"] = protocol.encode(enforced)
        try:
            results = await self._transaction(start, frames, covered, state, meta)
        except ValueError as exc:
            # coredis on a Redis Cluster: a refused command's reply it cannot decode
            # (an XADD at an id the stream has: a batch that landed, or the cluster's end).
            raise ResponseError(f"refused: {exc}") from exc
        if results and results[-1] is True:
            raise Ended
        refused = next((r for r in results if isinstance(r, Exception)), None)
        if refused is not None:
            raise refused
        self.frames += len(frames)
        self.sent = covered
        if state is not None:
            self.state_sent = state[0]
        if enforced is not None:
            self.enforced_sent = enforced
        self.trimmed_below = max(self.trimmed_below, covered.first_seq)

    async def _transaction(self, start: int, frames: list[memoryview], covered: Snapshot,
                           state: tuple[int, bytes] | None, meta: dict[str, bytes]) -> tuple:
        """One transaction: the stream and the snapshot that covers it change
        together. Its replies in order (a refused command's as its exception)."""
        sid = self.session.sid
        out = keys.out(sid)
        async with self.cluster.exclusive.pipeline(transaction=True, raise_on_error=False) as pipe:
            for i, frame in enumerate(frames):
                pipe.xadd(out, {"f": bytes(frame)}, identifier=keys.entry_id(start + i))
            if state is not None:
                # Only the latest version is kept: a reader behind by several puts
                # gets the current value once, as a local attachment does.
                pipe.xadd(keys.state(sid), {"v": state[1]}, identifier=keys.entry_id(state[0]),
                          trim_strategy=coredis.PureToken.MAXLEN, threshold=1,
                          trim_operator=coredis.PureToken.EQUAL)
            pipe.hset(keys.meta(sid), meta)
            if covered.first_seq > self.trimmed_below:
                pipe.xtrim(out, coredis.PureToken.MINID, covered.first_seq)
            # Whether the cluster ended the session meanwhile (bento/cluster/lost.py).
            # Then what this batch wrote is past the end that readers keep to (the
            # ``lost`` snapshot, and nothing after the exit frame), and it is the last.
            pipe.hexists(keys.meta(sid), "lost")
        return pipe.results or ()
