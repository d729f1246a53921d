"""The file ops of a connection: ``file_get`` and ``file_put`` on a session's work dir.

A mixin of ``bento.server.Connection`` (its ``by_token`` and ``send``). The
work dir is ``sessions/<id>/work``, the sandbox's home (a bind), so what the
function writes there is readable during the run and after it, until the
session's life ends; uploads go there while the function runs. The disk I/O
runs in a worker thread (bento/files.py: no symlink is followed, only regular
files are touched). Cancelled halfway, a ``file_put`` may have written its
chunk or not: the client sends it again with the same offset.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from bento import files, protocol


def _path(req: dict) -> list[str]:
    try:
        return files.check_path(req["path"])
    except files.FileError as exc:
        raise protocol.RequestError("bad_request", str(exc)) from None


async def _io(fn: Any, *args: Any) -> Any:
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except files.FileError as exc:
        raise protocol.RequestError(exc.code, str(exc)) from None
    except OSError as exc:
        raise protocol.RequestError("internal", f"file I/O failed: {exc.strerror}") from None


class FileOps:
    async def op_file_get(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=False)  # type: ignore[attr-defined]
        parts = _path(req)
        size = min(req["length"], files.CHUNK)
        data, total = await _io(files.read_file, os.path.join(s.dir, "work"), parts, req["offset"], size)
        await self.send(protocol.reply_ok(req["id"], data=data, size=total))  # type: ignore[attr-defined]

    async def op_file_put(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=True)  # type: ignore[attr-defined]
        parts = _path(req)
        if s.snap.has_ended:
            raise protocol.RequestError("gone", "the function has ended: files go into a running session")
        cap = self.config.max_upload_bytes  # type: ignore[attr-defined]
        if req["offset"] + len(req["data"]) > cap:
            raise protocol.RequestError("too_large", f"an uploaded file is at most {cap} bytes on this server")
        size = await _io(files.write_file, os.path.join(s.dir, "work"), parts, req["offset"], req["data"],
                         req["offset"] == 0)
        await self.send(protocol.reply_ok(req["id"], size=size))  # type: ignore[attr-defined]
