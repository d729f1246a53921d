"""The exchange's output side: the function's stdout, stderr and ``api.send`` become frames.

Every frame is appended to the session's output log (batched, one ``writev``
per round) and counted by the session core, whose actions the exchange
carries out. A disk that refuses a write stops the reading of the function's
output (it blocks, nothing is lost) until a retry succeeds. Runs inside the
exchange: no trio, never a blocking read, never trust what the pipes carry.
"""

from __future__ import annotations

import select
import time

from bento import protocol, session_core, sessionlog
from bento.launch import PIPE_BYTES, read_available

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from bento.exchange import Exchange

RETRY_SECONDS = 0.5

Parts = tuple  # the encoded data of a frame, in the pieces it came in (bytes or views)


class Output:
    """The output log and the pipes that feed it, for one exchange."""

    def __init__(self, ex: Exchange, log: sessionlog.Writer, read_size: int, output_bytes: int | None) -> None:
        self.ex = ex
        self.core = ex.core
        self.log = log
        self.read_size = read_size  # a stdout chunk's frame fits an out event
        self.output_limit = output_bytes
        self.output_total = 0
        self.stderr_tail = b""
        self.pipes: dict[int, str] = {}  # fd -> "stdout" | "stderr"
        self.tty_fd = -1  # stdout's fd: a terminal's master in a tty session
        self.pipe_poll = select.poll()
        # The pipes were found empty after the last read from the driver's link:
        # whatever was printed before a message already read is in the log, so
        # its api.send needs no poll of the pipes (one syscall per message saved).
        self.pipes_seen_empty = False
        self.stalled: list[tuple[str, Parts, int]] = []  # frames the disk refused, oldest first
        self.flush_blocked = False  # appended frames wait for the disk
        self.retry_at = 0.0

    @property
    def held_back(self) -> bool:
        """The disk refused output: stop reading the function's until it takes it."""
        return bool(self.stalled) or self.flush_blocked

    # -- the log ---------------------------------------------------------------

    def append(self, ch: str, data_cbor: Parts, size: int) -> None:
        """Add a frame to the output log. If the disk refuses it, the frame
        waits in memory and the function's output is no longer read (it
        blocks, nothing is lost) until a retry succeeds."""
        if not self.stalled:
            try:
                self._write_frame(ch, data_cbor, size)
                return
            except OSError as exc:
                self.ex.disk_trouble(f"cannot append to the output log: {exc}")
                self.retry_at = time.monotonic() + RETRY_SECONDS
        self.stalled.append((ch, data_cbor, size))
        self.ex.update_reading()

    def _write_frame(self, ch: str, data_cbor: Parts, size: int) -> None:
        """Append the frame ``[seq, ch, data]``; ``data_cbor`` is its encoded data
        in pieces, which the log keeps as they are until its batch is written
        (64 KiB chunks stay uncut and uncopied)."""
        seq = self.log.next_seq
        self.log.append_parts(seq, (protocol.frame_head(seq, ch), *data_cbor))
        if self.log.pending_bytes >= sessionlog.READ_CHUNK:
            self.flush()  # a full batch goes now (a refusal stops the reading)
        if ch == "exit":
            self.flush()
            self.ex.exit_written(seq)
            return
        actions = self.core.frame(seq, size)
        if actions is session_core.ANNOUNCE_ONLY and not self.core.full:
            # The common case, without apply's loop and update_reading: nothing
            # that decides the reading changed (the buffer was not full before either).
            self.ex.progress_dirty = True
        else:
            self.ex.apply(actions)

    def flush(self) -> None:
        """Write the frames appended in this round; a disk that refuses them
        stops the reading of the function's output until a retry succeeds."""
        was_blocked = self.flush_blocked
        try:
            self.log.flush()
        except OSError as exc:
            if not was_blocked:
                self.ex.disk_trouble(f"cannot append to the output log: {exc}")
            self.flush_blocked = True
            self.retry_at = time.monotonic() + RETRY_SECONDS
            self.ex.update_reading()
            return
        finally:
            self.core.durable(self.log.flushed_next)
        if was_blocked:
            self.flush_blocked = False
            self.ex.disk_trouble("the output log is writable again")
            self.ex.update_reading()

    def retry_stalled(self, now: float) -> None:
        if not self.stalled or now < self.retry_at:
            return
        self.retry_at = now + RETRY_SECONDS
        while self.stalled:
            ch, data_cbor, size = self.stalled[0]
            try:
                self._write_frame(ch, data_cbor, size)
            except OSError:
                return
            self.stalled.pop(0)
        self.ex.disk_trouble("the output log is writable again")
        self.ex.update_reading()

    def trim(self, first: int) -> None:
        try:
            self.log.drop_before(first)
        except OSError as exc:
            # The frames are freed all the same; the file stays, tried again at the next trim.
            self.ex.disk_trouble(f"cannot delete a trimmed output segment: {exc}")

    # -- the function's output ---------------------------------------------------

    def value(self, ch: str, data: bytes) -> None:
        """An ``api.send`` value (checked CBOR): after what the function printed before it."""
        self.drain_pipes()
        limit = self.output_limit
        if limit is not None and self.output_total + len(data) > limit:
            self.ex.kill("output_bytes")
            return
        self.output_total += len(data)
        self.append(ch, (data,), len(data))

    def stream(self, ch: str, chunk: bytes | memoryview) -> None:
        limit = self.output_limit
        if limit is not None:
            room = limit - self.output_total
            if len(chunk) > room:
                chunk = chunk[: max(0, room)]
                self.ex.kill("output_bytes")
                if not chunk:
                    return
        self.output_total += len(chunk)
        if ch == "stderr":
            self.stderr_tail = (self.stderr_tail + chunk)[-2048:]
        self.append(ch, (protocol.encode_head(2, len(chunk)), chunk), len(chunk))

    def watch(self, out_r: int, err_r: int) -> None:
        self.pipes = {out_r: "stdout", err_r: "stderr"}
        for fd in self.pipes:
            self.pipe_poll.register(fd, select.POLLIN)

    def on_pipe(self, fd: int) -> None:
        if fd in self.pipes:
            self.read_pipe(fd)

    def read_pipe(self, fd: int) -> bool:
        """One read of a stdout/stderr pipe; False when nothing more is there now.

        Up to the pipe's size at once (a fast writer costs one read per MiB,
        not per 64 KiB: 8% more throughput), cut into frames of ``read_size``;
        never more than the buffer has room for, but one frame at least."""
        want = min(PIPE_BYTES, max(self.read_size, self.core.room))
        try:
            chunk = read_available(fd, want)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.close_pipe(fd)
            return False
        ch, step = self.pipes[fd], self.read_size
        if len(chunk) <= step:
            self.stream(ch, chunk)
            return True
        view = memoryview(chunk)
        for at in range(0, len(chunk), step):
            self.stream(ch, view[at : at + step])
        return True

    def close_pipe(self, fd: int) -> None:
        # Closed after this round of events, so a stale event cannot hit a reused fd.
        self.ex.watch_fd(fd, 0, None)
        del self.pipes[fd]
        self.pipe_poll.unregister(fd)
        self.ex.to_close.append(fd)

    def drain_pipes(self) -> None:
        """Take what the function already wrote to stdout/stderr, so a message
        it sends after printing lands after the printed text. Pipes seen empty
        after the link's last read stay so for the messages that read brought:
        the driver writes a message only after what was printed before it."""
        if not self.pipes or self.pipes_seen_empty:
            return
        ready = self.pipe_poll.poll(0)
        if not ready:
            self.pipes_seen_empty = True
        for fd, _ev in ready:
            for _ in range(16):
                if fd not in self.pipes or not self.read_pipe(fd):
                    break

