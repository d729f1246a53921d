"""The session's rules as pure state: buffer policy, acks, history, input seqs, shared state, exit.

Sans-IO, like h11's ``_state.py``: everything that changes a session's
positions or its state lives here, and this module does no I/O, reads no
clock (time is passed in) and imports nothing but the stdlib's ``array``,
``collections`` and ``enum`` (the exchange, one small process per session,
runs it). The exchange feeds it events (a frame was appended, an ack came, an
input arrived, the function ended) and carries out the actions it returns
(trim the log, kill the function, save, announce); the server reads the same
rules through :class:`Snapshot` and :func:`life_over`.

The rules are those of docs/protocol.md §acknowledgements, §input, §state and
§lifetime; tests/unit/test_session_core.py checks each one.
"""

from __future__ import annotations

import array
import enum
from collections import namedtuple

TYPE_CHECKING = False  # typing is not imported at run time: the exchange loads this module
if TYPE_CHECKING:
    from typing import Any


class State(enum.Enum):
    """A session's state (the ``state`` field of ``attach``, ``status`` and ``exit``)."""

    #: the environment is being started; input is accepted and waits
    STARTING = "starting"
    #: the function runs
    RUNNING = "running"
    #: the function returned, raised, or called ``sys.exit``
    EXITED = "exited"
    #: it could not start: bad code, a missing entry, a sandbox failure
    FAILED = "failed"
    #: a signal, a limit, or ``destroy`` ended it
    KILLED = "killed"
    #: its exchange died before it could record the end
    LOST = "lost"


ENDED = frozenset({State.EXITED, State.FAILED, State.KILLED, State.LOST})

#: The state machine, as data: which state may follow which. Nothing leaves an
#: ended state; ``lost`` is reachable from any live state (the exchange died).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.FAILED, State.KILLED, State.LOST}),
    State.RUNNING: frozenset({State.EXITED, State.FAILED, State.KILLED, State.LOST}),
    State.EXITED: frozenset(),
    State.FAILED: frozenset(),
    State.KILLED: frozenset(),
    State.LOST: frozenset(),
}

POLICIES = ("block", "drop_oldest", "fail")
#: Acked frames kept readable per session when the server names no limit.
DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024
MAX_STATE_BYTES = 64 * 1024


class LocalError(Exception):
    """The caller broke a rule of this module (a transition the table forbids,
    a seq out of order): a bug in the shell, never the peer's fault."""


# -- actions: what the shell must do after an event ----------------------------------


class Trim(namedtuple("Trim", "first_seq")):
    """Frames below ``first_seq`` are no longer readable: delete the log segments that hold only them."""

    __slots__ = ()


class Kill(namedtuple("Kill", "reason")):
    """End the function because of the limit ``reason`` (e.g. ``"buffer"``)."""

    __slots__ = ()


class Save(namedtuple("Save", "now")):
    """The saved state changed: write it (``now``), or within a short delay."""

    __slots__ = ()


class Announce(namedtuple("Announce", "")):
    """Positions changed: tell the server (coalesced by the shell)."""

    __slots__ = ()


class StateChanged(namedtuple("StateChanged", "version value")):
    """The shared state has a new version: push it to the server's attachments."""

    __slots__ = ()


NOTHING: tuple = ()
ANNOUNCE_ONLY = _ANNOUNCE = (Announce(),)  # the common answer to frame(), which callers may test by identity
_SAVE_SOON = (Save(False), Announce())


# -- verdicts on an input ------------------------------------------------------------


class Refused(namedtuple("Refused", "code message")):
    """An input refused with the protocol error ``code`` (``input_gap``, ``gone``)."""

    __slots__ = ()


ACCEPT = "accept"
DUPLICATE = "duplicate"


class Snapshot(namedtuple("Snapshot", "state next_seq first_seq acked_seq input_seq buffer_bytes "
                                      "dropped_to ended exit exit_seq history_bytes waiting")):
    """A session's positions as the exchange last announced them (what ``attach``
    and ``status`` report). ``state`` is the state's text; ``ended`` epoch seconds;
    ``first_seq`` the first frame still readable; ``history_bytes`` the data bytes
    of readable frames that left the buffer (acked); ``waiting`` what the running
    function is blocked waiting for (one of :data:`WAITS`)."""

    __slots__ = ()

    @classmethod
    def from_map(cls, msg: dict) -> Snapshot:
        # No ``waiting`` from an exchange of wire version 6; texts shared by all sessions (_TEXT).
        state, waiting = msg["state"], msg.get("waiting")
        return cls._make([_TEXT.get(state, state), *(msg[k] for k in cls._fields[1:-1]), _TEXT.get(waiting, waiting)])

    @property
    def has_ended(self) -> bool:
        return self.state in _ENDED_TEXT

    def gap_reason(self, from_seq: int) -> str:
        """Why frames from ``from_seq`` up to ``first_seq - 1`` are gone: dropped by
        the buffer policy, or trimmed from the history."""
        return "dropped" if from_seq <= self.dropped_to else "trimmed"


_ENDED_TEXT = frozenset(s.value for s in ENDED)
NEW = Snapshot(State.STARTING.value, 1, 1, 0, 0, 0, 0, None, None, None, 0, None)
WAITS = (None, "recv", "stdin")  # what a function can be blocked on: nothing, api.recv(), stdin
_TEXT: dict[object, str] = {text: text for text in [*(s.value for s in State), *WAITS] if text is not None}


def judge_input(last: int, seq: int, running: bool) -> str | Refused:
    """The input rules: a seq at or below the last accepted one is a duplicate,
    one beyond last + 1 a gap; a new one is accepted only while the function
    runs (or is starting)."""
    if seq <= last:
        return DUPLICATE
    if seq > last + 1:
        return Refused("input_gap", f"input seq {seq} skips {last + 1}")
    if not running:
        return Refused("gone", "the function has ended")
    return ACCEPT


class SessionCore:
    """One session's positions, buffer, history, input seqs, shared state and state.

    The readable frames are ``first_seq .. next_seq - 1``; of them, those from
    ``buffer_seq`` on are the buffer (not yet acked: ``buffer_bytes``, which
    ``max_bytes`` and the policy count), those below it the history (acked, still
    readable: ``history_bytes``, trimmed oldest first beyond ``history_max``).

    ``sizes``: the data length of each output frame already in the log from seq
    ``size_base`` on (the exit frame counts 0: it is never blocked or dropped).
    ``saved``: what :meth:`saved` returned before a restart (empty for a new session).
    """

    def __init__(self, max_bytes: int, policy: str, *, saved: dict | None = None,
                 size_base: int = 1, sizes: array.array | None = None, input_seq: int = 0,
                 history_max: int = DEFAULT_HISTORY_BYTES) -> None:
        if policy not in POLICIES:
            raise LocalError(f"unknown buffer policy {policy!r}")
        saved = saved or {}
        self.max_bytes = max_bytes
        self.policy = policy
        self.history_max = history_max
        self.state = State(saved.get("state", State.STARTING.value))
        self.exit: dict | None = saved.get("exit")
        self.exit_seq: int | None = saved.get("exit_seq")
        self.ended: float | None = saved.get("ended")
        self.acked_seq: int = saved.get("acked_seq", 0)
        self.dropped_to: int = saved.get("dropped_to", 0)
        self.shared_version: int = saved.get("shared_version", 0)
        self.shared_value: bytes = saved.get("shared_value", b"\xf6")
        self.sizes = sizes if sizes is not None else array.array("q")
        self.size_base = size_base
        self.next_seq = size_base + len(self.sizes)  # the seq the next frame gets
        self.durable_next = self.next_seq  # frames below are on disk
        # A session saved before history existed deleted its acked frames.
        first = saved.get("first_seq", self.acked_seq + 1)
        self.first_seq = min(max(size_base, first, self.dropped_to + 1), self.next_seq)
        self.buffer_seq = min(max(self.first_seq, self.acked_seq + 1), self.next_seq)
        self.buffer_bytes = sum(self.sizes[self.buffer_seq - size_base:])
        self.history_bytes = sum(self.sizes[self.first_seq - size_base:self.buffer_seq - size_base])
        self.input_seq = input_seq
        self.function_over = self.state in ENDED  # the function's process has ended
        self.waiting: str | None = None  # one of WAITS, as the driver last said

    # -- state -----------------------------------------------------------------

    def _enter(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise LocalError(f"a session cannot go from {self.state.value} to {new.value}")
        self.state = new

    def started(self) -> tuple:
        """The function has its environment and runs."""
        self._enter(State.RUNNING)
        return _ANNOUNCE

    def function_ended(self) -> None:
        """The function's process is gone; its last output is still being read."""
        self.function_over = True
        self.waiting = None

    def wait(self, what: str | None) -> tuple:
        """The function is now blocked waiting for ``what`` (:data:`WAITS`), says its driver."""
        if what not in WAITS:
            raise LocalError(f"a function cannot wait for {what!r}")
        if self.function_over or what == self.waiting:
            return NOTHING
        self.waiting = what
        return _ANNOUNCE

    def recorded_exit(self, data: dict, seq: int, now: float) -> tuple:
        """The exit frame ``data`` (see :func:`classify_exit`) was appended at ``seq``."""
        self._enter(State(data["state"]))
        self.function_over, self.waiting = True, None
        self.exit, self.exit_seq, self.ended = data, seq, now
        self.sizes.append(0)
        self.next_seq = seq + 1
        return (Save(True), Announce())

    @property
    def accepts_work(self) -> bool:
        """Input and signals still reach the function."""
        return not self.function_over and self.state not in ENDED

    # -- output and the buffer -----------------------------------------------------

    @property
    def full(self) -> bool:
        """Policy ``block`` with the buffer at its limit: stop reading the function's output."""
        return self.policy == "block" and self.buffer_bytes >= self.max_bytes and not self.function_over

    @property
    def room(self) -> int:
        """Bytes of frame data the buffer takes before it is at its limit."""
        return max(0, self.max_bytes - self.buffer_bytes)

    def frame(self, seq: int, size: int) -> tuple:
        """An output frame of ``size`` data bytes was appended at ``seq``.

        Past the limit, ``drop_oldest`` frees the oldest frames (the new one
        excepted) and records how far it dropped (the history below them goes
        too: what is readable stays one run of frames); ``fail`` asks for the
        function to be killed; ``block`` is seen by the shell through :attr:`full`."""
        if seq != self.next_seq:
            raise LocalError(f"frame {seq} appended where {self.next_seq} was expected")
        self.sizes.append(size)
        self.next_seq = seq + 1
        self.buffer_bytes += size
        if self.buffer_bytes <= self.max_bytes:
            return _ANNOUNCE
        if self.policy == "drop_oldest":
            drop, freed, excess = self.buffer_seq, 0, self.buffer_bytes - self.max_bytes
            base, sizes = self.size_base, self.sizes
            while freed < excess and drop < seq:
                freed += sizes[drop - base]
                drop += 1
            if drop > self.buffer_seq:
                self.dropped_to = drop - 1
                self.buffer_seq = drop
                self.buffer_bytes -= freed
                self.history_bytes = 0
                return (self._trim(drop), *_SAVE_SOON)
        elif self.policy == "fail" and not self.function_over:
            return (Kill("buffer"), Announce())
        return _ANNOUNCE

    def durable(self, next_seq: int) -> None:
        """Every frame below ``next_seq`` is on disk (readers may have it)."""
        self.durable_next = next_seq

    def ack(self, seq: int) -> tuple:
        """The owner's ack: every frame up to ``seq`` is received (capped at the last
        durable frame); they leave the buffer for the history."""
        seq = min(seq, self.durable_next - 1)
        if seq <= self.acked_seq:
            return NOTHING
        self.acked_seq = seq
        if seq >= self.buffer_seq:
            lo, hi = self.buffer_seq - self.size_base, seq + 1 - self.size_base
            moved = sum(self.sizes[lo:hi])
            self.buffer_bytes -= moved
            self.history_bytes += moved
            self.buffer_seq = seq + 1
        return self.trim_history(self.history_max) or _SAVE_SOON

    def trim_history(self, keep_bytes: int) -> tuple:
        """Trim the history, oldest frames first, to at most ``keep_bytes``
        (the per-session limit, or less when the server-wide one is reached)."""
        if self.history_bytes <= keep_bytes:
            return NOTHING
        first, excess, base, sizes = self.first_seq, self.history_bytes - keep_bytes, self.size_base, self.sizes
        freed = 0
        while freed < excess and first < self.buffer_seq:
            freed += sizes[first - base]
            first += 1
        self.history_bytes -= freed
        return (self._trim(first), *_SAVE_SOON)

    def _trim(self, first: int) -> Trim | None:
        """Frames below ``first`` are no longer readable (their bytes are already
        out of ``buffer_bytes`` and ``history_bytes``)."""
        if first <= self.first_seq:
            return None
        hi = first - self.size_base
        self.first_seq = first
        if hi > 4096 and hi > len(self.sizes) // 2:
            del self.sizes[:hi]
            self.size_base = first
        return Trim(first)

    # -- input ------------------------------------------------------------------

    def input(self, seq: int) -> str | Refused:
        """Judge input ``seq``: ACCEPT (record it, then call :meth:`input_recorded`),
        DUPLICATE (answer with the last accepted seq), or Refused."""
        return judge_input(self.input_seq, seq, self.accepts_work)

    def input_recorded(self, seq: int) -> tuple:
        """Input ``seq`` is in the input log: accepted (its reply tells the server)."""
        if seq != self.input_seq + 1:
            raise LocalError(f"input {seq} recorded after {self.input_seq}")
        self.input_seq = seq
        return NOTHING

    # -- shared state --------------------------------------------------------------

    def put_state(self, value: bytes, if_version: int | None) -> tuple[bool, int, tuple]:
        """Compare-and-set of the shared state: (ok, version now, actions)."""
        if len(value) > MAX_STATE_BYTES:
            raise LocalError(f"shared state over {MAX_STATE_BYTES} bytes")
        if if_version is not None and if_version != self.shared_version:
            return False, self.shared_version, NOTHING
        self.shared_version += 1
        self.shared_value = value
        return True, self.shared_version, (Save(True), StateChanged(self.shared_version, value))

    # -- what is kept and told ---------------------------------------------------------

    def snapshot(self) -> dict:
        """The positions for the server (the fields of :class:`Snapshot`)."""
        durable = self.durable_next
        return {
            "state": self.state.value,
            "next_seq": durable,
            "first_seq": min(self.first_seq, durable),
            "acked_seq": self.acked_seq,
            "input_seq": self.input_seq,
            "buffer_bytes": self.buffer_bytes,
            "dropped_to": self.dropped_to,
            "ended": self.ended,
            "exit": self.exit,
            "exit_seq": self.exit_seq,
            "history_bytes": self.history_bytes,
            "waiting": self.waiting,
        }

    def saved(self) -> dict:
        """What survives a restart of the exchange (with the logs themselves)."""
        return {
            "state": self.state.value,
            "exit": self.exit,
            "ended": self.ended,
            "exit_seq": self.exit_seq,
            "acked_seq": self.acked_seq,
            "first_seq": self.first_seq,
            "dropped_to": self.dropped_to,
            "shared_version": self.shared_version,
            "shared_value": self.shared_value,
        }


# -- the end of the function ---------------------------------------------------------


class ExitFacts(namedtuple("ExitFacts", "signal code kill_reason kill_error report driver_up "
                                        "user_signal oom_killed cpu_over stderr_tail status")):
    """What the exchange knows when the function's process is gone.

    ``signal``: the name of the signal that ended it (``"KILL"``) or None; ``code``
    its exit status or None; ``kill_reason``: the limit the exchange enforced
    (``"wall_s"``, ``"buffer"``, ``"destroyed"``...) or None; ``kill_error`` the
    error to report for it; ``report``: the driver's exit message or None;
    ``driver_up``: the driver said it was up; ``user_signal``: the signal a client
    asked for; ``oom_killed`` / ``cpu_over``: the memory / CPU limit was hit;
    ``stderr_tail``: the end of stderr (text); ``status``: the raw wait status."""

    __slots__ = ()


_EXITED, _FAILED, _KILLED, _LOST = (s.value for s in (State.EXITED, State.FAILED, State.KILLED, State.LOST))


def _limit(f: ExitFacts) -> str | None:
    if f.kill_reason is not None:
        return None if f.kill_reason == "destroyed" else f.kill_reason
    if f.signal == "KILL" and f.oom_killed:
        return "memory_bytes"
    if f.signal == "KILL" and f.cpu_over:
        return "cpu_s"  # the RLIMIT_CPU backstop beat the exchange's watch
    return None


def _killed_by_limit(f: ExitFacts) -> dict:
    limit = _limit(f)
    return {"state": _KILLED, "signal": "KILL",
            "error": f.kill_error or {"type": "LimitExceeded", "message": limit}}


def _did_not_start(f: ExitFacts) -> dict:
    return {"state": _FAILED, "error": {
        "type": "SandboxError",
        "message": f"the environment did not start (status {f.status}): {f.stderr_tail[-500:]}",
        "traceback": ""}}


def _reported(f: ExitFacts) -> dict:
    rep = f.report
    kind = rep.get("kind")
    if kind == "failed":
        return {"state": _FAILED, "error": rep.get("error")}
    if kind == "interrupted":
        return {"state": _KILLED, "signal": "INT", "error": rep.get("error")}
    return {"state": _EXITED, "code": rep.get("code", 0), "error": rep.get("error"),
            "result": rep.get("result")}


#: How the end of a function is classified: the first rule whose test holds
#: gives the exit's fields (the rest are null). One table, read top to bottom.
EXIT_RULES = (
    ("a limit the exchange enforced", lambda f: _limit(f) is not None, _killed_by_limit),
    ("the environment never came up", lambda f: f.report is None and not f.driver_up, _did_not_start),
    ("a client's signal, no report", lambda f: f.report is None and f.user_signal is not None,
     lambda f: {"state": _KILLED, "signal": f.user_signal}),
    ("a signal ended the process", lambda f: f.signal is not None,
     lambda f: {"state": _KILLED, "signal": f.signal}),
    ("the driver reported the end", lambda f: f.report is not None, _reported),
    ("the process exited by itself", lambda f: True, lambda f: {"state": _EXITED, "code": f.code}),
)


def classify_exit(facts: ExitFacts) -> dict:
    """The ``exit`` frame's data for a function whose process ended."""
    data: dict[str, Any] = {"state": _EXITED, "code": None, "signal": None, "result": None, "error": None}
    for _name, test, fields in EXIT_RULES:
        if test(facts):
            data.update(fields(facts))
            return data
    raise LocalError("no exit rule matched")  # the last rule always does


def failed_exit(type_: str, message: str) -> dict:
    """The exit data of a session whose function could not start."""
    return {"state": _FAILED, "code": None, "signal": None, "result": None,
            "error": {"type": type_, "message": message, "traceback": ""}}


def lost_exit() -> dict:
    """The exit data of a session adopted after its exchange died."""
    return {"state": _LOST, "code": None, "signal": None, "result": None,
            "error": {"type": "ExchangeLost",
                      "message": "the session's exchange died; output up to here is kept",
                      "traceback": ""}}


# -- lifetime ---------------------------------------------------------------------------


def life_over(snap: Snapshot, attached: bool, since_end: float, keep: float) -> bool:
    """Whether a session's life is over (the server then removes it).

    A running function is never ended by its session's lifetime (its limits
    do that). Never while attached. An ended session stays readable — exit,
    history, files — for the keep period after its end (``since_end``), whether
    or not the owner acked its exit."""
    if attached or not snap.has_ended:
        return False
    return since_end >= keep
