"""The bound on a session's work dir, for the exchange: what the function may leave on the host's disk.

The sandbox's home is a bind of the session's work dir (so clients can fetch
its files after the run), which makes it host disk, not a tmpfs that its size
bounds. While the function runs, the exchange adds up the work dir every
second and kills the function (``LimitExceeded work_bytes``) once it holds
more than the server's ``--max-work-bytes`` or more than MAX_ENTRIES names
(inodes). The walk stops as soon as either is passed, so a huge tree costs
one bounded walk. A burst between two checks can overshoot by what the disk
takes in a second. No trio (it runs in the exchange).
"""

from __future__ import annotations

import os

INTERVAL_S = 1.0
MAX_ENTRIES = 100_000


class WorkDirWatch:
    def __init__(self, path: str, max_bytes: int, start: float) -> None:
        self.path = path
        self.max_bytes = max_bytes
        # The first check a second after the function's start, not at it: what is
        # there then the server put there, and the walk would delay its first output.
        self.next_check = start + INTERVAL_S

    def over(self, now: float) -> bool:
        """Due for a check at ``now`` and over the bound (True at most once per check)."""
        if now < self.next_check:
            return False
        self.next_check = now + INTERVAL_S
        total = entries = 0
        stack = [self.path]
        while stack:
            try:
                it = os.scandir(stack.pop())
            except OSError:
                continue
            with it:
                for entry in it:
                    entries += 1
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
                    if total > self.max_bytes or entries > MAX_ENTRIES:
                        return True
        return False
