"""Where a client stands in one session: the output position and the input log.

Pure state (sans-IO, like bento.protocol): no trio, no sockets, no clock.
The SDK feeds it what arrives and asks it what to (re)send; the rules that
make delivery exactly-once live here and are unit-tested on plain values:

- output: frames are accepted only in seq order; a frame at or below the
  held position is a duplicate and dropped (counted); a hole becomes a
  synthetic ``Gap`` so loss is never silent. Re-attaching after a drop asks
  for ``held + 1``.
- input: every input gets the next seq and stays pending until an ``in_ack``
  covers it; after a reconnect everything pending is sent again with the same
  seqs (the server ignores duplicates).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bento_clients.frames import Frame, Gap, frame_from_wire

__all__ = ["InputLog", "OutputTracker"]


class OutputTracker:
    """The output position of one attachment.

    ``held`` is the highest seq received (the next attach asks from
    ``held + 1``)."""

    def __init__(self, from_seq: int = 1) -> None:
        if from_seq < 1:
            raise ValueError("from_seq must be at least 1")
        self.held = from_seq - 1
        self.duplicates = 0
        self.holes = 0

    def accept(self, seq: Any, ch: Any, data: Any) -> list[Frame]:
        """The frames to deliver for one wire frame: [] for a duplicate, the frame,
        or a synthetic ``Gap`` then the frame when frames were skipped.

        Raises ValueError for a frame that is not well formed."""
        if type(seq) is not int or seq < 1 or type(ch) is not str:
            raise ValueError(f"malformed frame [{seq!r}, {ch!r}, ...]")
        frame = frame_from_wire(seq, ch, data)
        first = frame.from_seq if isinstance(frame, Gap) else seq
        if seq <= self.held:
            self.duplicates += 1
            return []
        out: list[Frame] = []
        if first > self.held + 1:
            self.holes += 1
            out.append(Gap(first - 1, self.held + 1, first - 1, "missing (client saw a hole)"))
        elif first <= self.held:
            # A gap that overlaps what we hold: keep only its new part.
            assert isinstance(frame, Gap)
            frame = Gap(seq, self.held + 1, seq, frame.reason)
        out.append(frame)
        self.held = seq
        return out


class InputLog:
    """One session's input as this client sent it: seqs, pending items, acks.

    ``accepted`` is the highest seq the server acknowledged (cumulative
    ``in_ack``); ``last`` the highest seq given out; ``pending`` maps each seq
    above ``accepted`` that this client knows to its item (a value, or
    ``frames.EOF``)."""

    def __init__(self, accepted: int = 0) -> None:
        self.accepted = accepted
        self.last = accepted
        self.pending: dict[int, Any] = {}

    def add(self, item: Any, seq: int | None = None) -> int:
        """Record a new input; returns its seq (the next one unless ``seq`` is
        given, which must be above every seq given out so far)."""
        if seq is None:
            seq = self.last + 1
        elif seq <= self.last:
            raise ValueError(f"input seq {seq} is not above {self.last}")
        self.last = seq
        self.pending[seq] = item
        return seq

    def ack(self, seq: int) -> bool:
        """An ``in_ack``: every input up to ``seq`` is accepted. True if it moved."""
        if seq <= self.accepted:
            return False
        self.accepted = seq
        self.last = max(self.last, seq)
        for s in [s for s in self.pending if s <= seq]:
            del self.pending[s]
        return True

    def reset(self, accepted: int, pending: Iterable[tuple[int, Any]] = ()) -> None:
        """After an attach: the server has accepted up to ``accepted``; ``pending``
        (seq, item) pairs recorded elsewhere (a state file) join the log."""
        for seq, item in pending:
            if seq > self.accepted and seq not in self.pending:
                self.pending[seq] = item
        self.pending = dict(sorted(self.pending.items()))
        self.last = max([self.last, accepted, *self.pending])
        self.ack(accepted)

    def unsent(self, after: int) -> list[tuple[int, Any]]:
        """Pending inputs with seq above ``after``, in seq order."""
        return [(s, item) for s, item in self.pending.items() if s > after]

    def __len__(self) -> int:
        return len(self.pending)
