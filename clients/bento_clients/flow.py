"""Flow control of one attachment: the frames received and not read yet, and when
to pause the attachment so that they stay bounded.

Pure state (sans-IO, like ``positions``): no trio, no sockets, no clock. The
session feeds it what arrives and what the user reads; it answers when to
detach (pause) and when to attach again (resume). The rules:

- each frame of an ``out`` event is queued with an equal share of the event's
  wire size (``queued_bytes`` is their sum);
- past ``limit`` queued bytes the attachment pauses, once (the session
  detaches on the server, whose buffer policy then applies);
- while paused, frames still arriving (sent before the server had the detach)
  are dropped, not held, and counted in ``refetched``: the resume asks for them
  again from the last seq held + 1;
- a paused queue read down to half the limit resumes; the pause ends when the
  attach reply arrives (``attached``), so the frames right behind that reply
  are taken, and a resume that was refused or cut short may be tried again
  (``resume_ended``).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["ReadQueue"]

T = TypeVar("T")


class ReadQueue(Generic[T]):
    """Frames waiting to be read, bounded by pausing at ``limit`` bytes (None: no
    bound)."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("the limit must be at least 1 byte (or None)")
        self.limit = limit
        self.queued_bytes = 0
        self.paused = False
        self.resuming = False
        self.pauses = 0
        self.refetched = 0
        self._items: deque[tuple[T, int]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def arrived(self, count: int) -> bool:
        """An ``out`` event of ``count`` frames arrived: True to take its frames
        (``push`` each), False while paused (dropped, asked for again on resume)."""
        if self.paused:
            self.refetched += count
            return False
        return True

    def push(self, item: T, size: int) -> None:
        self._items.append((item, size))
        self.queued_bytes += size

    def take(self) -> T | None:
        """The oldest item not read yet, or None."""
        if not self._items:
            return None
        item, size = self._items.popleft()
        self.queued_bytes -= size
        return item

    def take_all(self) -> T | None:
        """Read everything at once; the newest item, or None."""
        last = self._items[-1][0] if self._items else None
        self._items.clear()
        self.queued_bytes = 0
        return last

    def should_pause(self, allowed: bool = True) -> bool:
        """True when the caller must pause now (detach): the queue is past the
        limit and not paused yet. ``allowed`` False (the session has ended, or no
        connection is up) never pauses."""
        if not allowed or self.limit is None or self.paused or self.queued_bytes <= self.limit:
            return False
        self.paused = True
        self.pauses += 1
        return True

    def should_resume(self, allowed: bool = True) -> bool:
        """True when the caller must resume now (attach again): paused, read down
        to half the limit, and no resume on its way. The caller reports the end
        of its attempt with ``resume_ended``."""
        if not allowed or not self.paused or self.resuming:
            return False
        if self.limit is not None and self.queued_bytes > self.limit // 2:
            return False
        self.resuming = True
        return True

    def attached(self) -> None:
        """The attach reply arrived: not paused from here on."""
        self.paused = False

    def resume_ended(self) -> None:
        """The resume attempt is over (attached, refused, or cut short)."""
        self.resuming = False
