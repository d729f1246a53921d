"""A session's on-disk logs: append-only segment files of checksummed records.

The exchange is the only writer (``Writer``); the server only reads
(``Cursor``). A record is a header (payload length, seq, CRC-32 of seq and
payload) followed by the payload. For the output log the payload is the CBOR
encoding of the frame ``[seq, ch, data]``, exactly the bytes the server splices
into ``out`` events, so frames are never decoded or re-encoded on their way to
a client.

A crash can leave a torn record at the end of the last segment: the writer
finds it on recovery (short header, short payload or bad checksum) and cuts it
off, so a reader never sees garbage. Readers only read records whose seq the
exchange has announced, so they never race a write in progress.

This module must stay importable without trio (the exchange imports it) and
must never trust what it reads: lengths are bounded and checksums checked.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

HEAD = struct.Struct("<IQI")  # payload length, seq, crc32(seq bytes + payload)
MAX_PAYLOAD = 64 * 1024 * 1024
SEGMENT_BYTES = 8 * 1024 * 1024
READ_CHUNK = 1024 * 1024
IOV_MAX = 1024  # Linux's limit on the buffers of one writev


def write_atomic(path: str, data: bytes, mode: int = 0o600, prepared: str | None = None) -> None:
    """Replace ``path`` with ``data`` all at once: a crash leaves the old file or
    the new one, never a mix (write to a temporary name, then rename).
    ``prepared``: an empty file made ahead of time to be that temporary (no
    file is made now; bento/sessiondisk.py prepare_dir)."""
    if prepared is None:
        tmp = f"{path}.tmp.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    else:
        tmp = prepared
        # Not O_TRUNC: truncating a file to nothing makes ext4 (auto_da_alloc) start
        # its write-back when it is closed, a disk write on an execute's path. The
        # copy is empty; one that is not (a crash's leftover) is cut after the write.
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if prepared is not None and os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class LogCorrupt(Exception):
    """A record that was announced as complete does not check out."""


def _crc(seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(seq.to_bytes(8, "little")))


def pack(seq: int, payload: bytes) -> bytes:
    return HEAD.pack(len(payload), seq, _crc(seq, payload)) + payload


def segment_name(prefix: str, start_seq: int) -> str:
    return f"{prefix}.{start_seq:020d}"


def list_segments(dirpath: str, prefix: str) -> list[tuple[int, str]]:
    """Segments as (first seq, path), oldest first."""
    out = []
    for name in os.listdir(dirpath):
        head, _, tail = name.partition(".")
        if head == prefix and len(tail) == 20 and tail.isdigit():
            out.append((int(tail), os.path.join(dirpath, name)))
    out.sort()
    return out


def drop_segments(segments: list[tuple[int, str]], seq: int) -> None:
    """Delete the segments of ``segments`` (oldest first, as ``list_segments``
    gives them) that hold only records below ``seq``, and take them off the list."""
    while len(segments) > 1 and segments[1][0] <= seq:
        try:
            os.unlink(segments[0][1])
        except FileNotFoundError:
            pass
        # Any other error leaves the segment listed (tried again next time)
        # and goes to the caller.
        segments.pop(0)


def parse(buf: bytes | memoryview, offset: int = 0) -> Iterator[tuple[int, int, int, int]]:
    """Yield (seq, payload start, payload end, record end) for each whole, valid
    record in ``buf`` from ``offset``; stop at the first incomplete or invalid one."""
    n = len(buf)
    mv = memoryview(buf)
    while offset + HEAD.size <= n:
        length, seq, crc = HEAD.unpack_from(buf, offset)
        start = offset + HEAD.size
        end = start + length
        if length > MAX_PAYLOAD or end > n or _crc(seq, mv[start:end]) != crc:
            return
        yield seq, start, end, end
        offset = end


def scan_file(path: str) -> Iterator[tuple[int, bytes, int]]:
    """Yield (seq, payload, record end offset) for every valid record of a
    segment, stopping at the first incomplete or invalid one."""
    with open(path, "rb") as f:
        base = 0
        buf = b""
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                return
            buf = buf + chunk if buf else chunk
            used = 0
            for seq, start, end, rec_end in parse(buf):
                yield seq, bytes(buf[start:end]), base + rec_end
                used = rec_end
            base += used
            buf = buf[used:]
            if len(buf) >= HEAD.size:
                length = HEAD.unpack_from(buf, 0)[0]
                if length > MAX_PAYLOAD:
                    return


def _advance(parts: list[bytes | memoryview], i: int, off: int, n: int) -> tuple[int, int]:
    """From byte ``off`` of ``parts[i]``, ``n`` bytes on: the part and the offset in it."""
    n += off
    while i < len(parts) and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    return i, n


def _from(parts: list[bytes | memoryview], i: int, off: int) -> list[bytes | memoryview]:
    """The parts from byte ``off`` of ``parts[i]`` on (a new list)."""
    rest = parts[i:]
    if off:
        rest[0] = memoryview(rest[0])[off:]
    return rest


class Writer:
    """Appends records to a log's segments. Used only by the exchange.

    On open it recovers: the torn tail of the last segment (if any) is cut off,
    and ``next_seq`` is one past the last valid record.
    """

    def __init__(self, dirpath: str, prefix: str, segment_bytes: int = SEGMENT_BYTES,
                 buffered: bool = False) -> None:
        self.dirpath = dirpath
        self.prefix = prefix
        self.segment_bytes = segment_bytes
        # Buffered: records wait in memory until the owner calls flush() (one
        # write per batch; an append writes nothing, though starting a new
        # segment may fail); ``flushed_next`` is then the first seq not yet on disk.
        self.buffered = buffered
        # Pending records as the pieces they came in (written with one writev,
        # not copied into a batch first: that copy was 18% of the exchange's CPU).
        self.pending: list[bytes | memoryview] = []
        self.pending_bytes = 0
        self.pending_ends: list[int] = []  # where each pending record ends, in bytes
        self.cut_to: int | None = None  # a partial write to take back before the next write
        self.segments = list_segments(dirpath, prefix)
        self.fd = -1
        self.size = 0
        self.next_seq = 1
        self.torn_bytes = 0
        if self.segments:
            self.next_seq = self.segments[-1][0]
            path = self.segments[-1][1]
            valid_end = 0
            for seq, _payload, rec_end in scan_file(path):
                self.next_seq = seq + 1
                valid_end = rec_end
            file_size = os.path.getsize(path)
            if file_size > valid_end:
                self.torn_bytes = file_size - valid_end
                os.truncate(path, valid_end)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self.size = valid_end
        self.flushed_next = self.next_seq

    def records(self) -> Iterator[tuple[int, bytes]]:
        """Every record still on disk, oldest first (for recovery). A segment
        deleted meanwhile (trimmed history: the oldest go first) is skipped."""
        for _start, path in list_segments(self.dirpath, self.prefix):
            records = scan_file(path)
            try:
                first = next(records)  # opens the file: once open, a delete does not matter
            except (FileNotFoundError, StopIteration):
                continue
            yield first[0], first[1]
            for seq, payload, _end in records:
                yield seq, payload

    def append(self, seq: int, payload: bytes) -> None:
        self.append_parts(seq, (payload,))

    def append_parts(self, seq: int, parts: tuple[bytes | memoryview, ...]) -> None:
        """Append one record whose payload is ``parts`` joined. The parts are
        kept until written: they must not change (bytes, or views of bytes)."""
        if seq != self.next_seq:
            raise ValueError(f"log {self.prefix}: appending seq {seq}, expected {self.next_seq}")
        if self.fd < 0 or (self.size >= self.segment_bytes and not self.pending):
            self._rotate(seq)
        crc = zlib.crc32(seq.to_bytes(8, "little"))
        length = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
            length += len(part)
        self.pending.append(HEAD.pack(length, seq, crc))
        self.pending.extend(parts)
        self.pending_bytes += HEAD.size + length
        self.pending_ends.append(self.pending_bytes)
        self.next_seq = seq + 1
        if not self.buffered:
            try:
                self.flush()
            except OSError:
                # Unbuffered: the caller learns the record is not in the log, so
                # it is not: the same seq may be appended again later.
                self.pending, self.pending_ends, self.pending_bytes = [], [], 0
                self.next_seq = self.flushed_next
                raise

    def flush(self) -> None:
        """Write what is pending. On an error (a full disk) the whole records
        written count, a partial one is taken back, and the rest stays pending
        for a retry (so a full disk holds what fits, to the record)."""
        if not self.pending:
            return
        if self.cut_to is not None:
            # A partial record from a failed flush is still on disk: cut it first.
            os.ftruncate(self.fd, self.cut_to)
            self.cut_to = None
        parts, ends, total = self.pending, self.pending_ends, self.pending_bytes
        self.pending, self.pending_ends, self.pending_bytes = [], [], 0
        done = 0
        try:
            i, off = 0, 0  # the next part to write, and how much of it is written
            while i < len(parts):
                batch = _from(parts[i : i + IOV_MAX], 0, off)
                n = os.writev(self.fd, batch)
                done += n
                if n == sum(map(len, batch)):
                    i, off = i + len(batch), 0  # all of it (the usual case: no walk over its parts)
                else:
                    i, off = _advance(parts, i, off, n)
        except OSError:
            whole = 0
            while whole < len(ends) and ends[whole] <= done:
                whole += 1
            keep = ends[whole - 1] if whole else 0
            self.size += keep
            self.flushed_next += whole
            self.pending = _from(parts, *_advance(parts, 0, 0, keep))
            self.pending_bytes = total - keep
            self.pending_ends = [end - keep for end in ends[whole:]]
            if done > keep:
                self.cut_to = self.size  # the next flush cuts it if this cannot
                os.ftruncate(self.fd, self.size)
                self.cut_to = None
            raise
        self.size += total
        self.flushed_next = self.next_seq

    def _rotate(self, start_seq: int) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1  # a failed open below must not leave a closed fd to close again
        path = os.path.join(self.dirpath, segment_name(self.prefix, start_seq))
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        self.segments.append((start_seq, path))
        self.size = 0

    def drop_before(self, seq: int) -> None:
        """Delete whole segments that hold only records below ``seq``."""
        drop_segments(self.segments, seq)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Cursor:
    """A reader's position in an output log: the next seq it wants.

    Reads only records below ``limit`` (the seq the exchange has announced as
    written), so it never sees a record being written. Cancellation: a read is
    synchronous and leaves the cursor either before or after the whole batch.

    ``verify_below``: records below this seq have their checksum checked (by
    default all). The server reads a record written while it ran and while this
    reader was attached without the check (see ``Session.check_log``): it was
    announced after its write returned, a moment ago, and a crash that could
    damage it ends the server too. What a reader finds already on disk when it
    starts (written a while ago, perhaps evicted and read back) is checked.
    Lengths and seqs are checked always.
    """

    def __init__(self, dirpath: str, prefix: str, next_seq: int, verify_below: int = 1 << 62) -> None:
        self.dirpath = dirpath
        self.prefix = prefix
        self.next_seq = next_seq
        self.verify_below = verify_below
        self._fd = -1
        self._seg_start = 0
        self._offset = 0
        self._positioned = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._positioned = False

    def seek(self, seq: int) -> None:
        self.close()
        self.next_seq = seq

    def _position(self) -> bool:
        """Open the segment holding ``next_seq`` and find its offset."""
        self.close()
        if self.next_seq == 1:  # while the first segment is there, it starts with record 1
            try:
                self._fd = os.open(os.path.join(self.dirpath, segment_name(self.prefix, 1)), os.O_RDONLY)
            except FileNotFoundError:
                pass  # trimmed: the oldest segment left is found below
            else:
                self._seg_start, self._offset, self._positioned = 1, 0, True
                return True
        segs = list_segments(self.dirpath, self.prefix)
        chosen = None
        for start, path in segs:
            if start <= self.next_seq:
                chosen = (start, path)
        if chosen is None:
            return False
        start, path = chosen
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        offset = 0
        if start < self.next_seq:  # (a segment starts with its first record)
            for seq, _payload, rec_end in scan_file(path):
                if seq >= self.next_seq:
                    break
                offset = rec_end
        self._fd, self._seg_start, self._offset = fd, start, offset
        self._positioned = True
        return True

    def _next_segment(self) -> bool:
        for start, path in list_segments(self.dirpath, self.prefix):
            if start > self._seg_start:
                if start != self.next_seq:
                    raise LogCorrupt(f"segment starts at {start}, expected {self.next_seq}")
                self.close()
                self._fd = os.open(path, os.O_RDONLY)
                self._seg_start, self._offset = start, 0
                self._positioned = True
                return True
        return False

    def read(self, limit: int, max_bytes: int, max_count: int = 4096) -> list[memoryview]:
        """Payloads of records from ``next_seq`` up to (not including) ``limit``,
        at most ``max_bytes`` in all (but at least one record when one is available),
        as views into one read buffer (no copy per record).
        Raises FileNotFoundError when the wanted records are no longer on disk."""
        out: list[memoryview] = []
        if self.next_seq >= limit:
            return out
        if not self._positioned and not self._position():
            raise FileNotFoundError(f"seq {self.next_seq} is not on disk")
        total = 0
        while self.next_seq < limit and total < max_bytes and len(out) < max_count:
            # No more than the file holds: a buffer of 128 KiB or more is an mmap
            # and an munmap per read (as in launch.read_available).
            want = min(READ_CHUNK, max_bytes - total) + HEAD.size
            want = min(want, max(os.fstat(self._fd).st_size - self._offset, HEAD.size))
            buf = os.pread(self._fd, want, self._offset)
            if len(buf) < HEAD.size:
                if not self._next_segment():
                    raise LogCorrupt(f"record {self.next_seq} announced but not found")
                continue
            length = HEAD.unpack_from(buf, 0)[0]
            if length > MAX_PAYLOAD:
                raise LogCorrupt(f"record {self.next_seq} claims {length} bytes")
            if HEAD.size + length > len(buf):
                buf = os.pread(self._fd, HEAD.size + length, self._offset)
                if len(buf) < HEAD.size + length:
                    raise LogCorrupt(f"record {self.next_seq} is short")
            # The records of this read. The cursor's fields live in locals, stored
            # back at every exit: a 100 B record costs ~0.5 us here, ~0.9 before.
            view, size, pos, seq_want = memoryview(buf), len(buf), 0, self.next_seq
            unpack, head, verify_below = HEAD.unpack_from, HEAD.size, self.verify_below
            stop = min(limit, seq_want + max_count - len(out))  # the seq that ends the batch
            append = out.append
            full = False
            try:
                while pos + head <= size:
                    length, seq, crc = unpack(buf, pos)
                    end = pos + head + length
                    if length > MAX_PAYLOAD or seq != seq_want:
                        raise LogCorrupt(f"expected record {seq_want}, found seq {seq} length {length}")
                    if end > size:
                        break
                    if out and total + length > max_bytes:
                        full = True  # the next record would overshoot the batch
                        break
                    payload = view[pos + head : end]
                    if seq < verify_below and _crc(seq, payload) != crc:
                        raise LogCorrupt(f"record {seq} fails its checksum")
                    append(payload)
                    total += length
                    seq_want += 1
                    pos = end
                    if seq_want >= stop or total >= max_bytes:
                        break
            finally:
                self.next_seq = seq_want
                self._offset += pos
            if full:
                return out
        return out
