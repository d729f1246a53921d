"""What a connection does for real jobs: an execute's packages, files and terminal, and the ops on them.

The session metadata of an execute's packages (bento/envs.py), files and a
module (bento/files.py), as functions of the server that runs it (a cluster
node builds them for an execute another node handed it). A mixin of
``bento.server.Connection`` (its ``by_token``, ``send``, ``config``,
``registry`` and ``server``): ``resize``; ``file_get``
and ``file_put`` on a session's work dir. The work dir is
``sessions/<id>/work``, the sandbox's home (a bind), so what the function
writes there is readable during the run and after it, until the session's
life ends; uploads go there while the function runs. The disk I/O
runs in a worker thread (bento/files.py: no symlink is followed, only regular
files are touched). Cancelled halfway, a ``file_put`` may have written its
chunk or not: the client sends it again with the same offset.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

import trio

from bento import envs, events, files, protocol

if TYPE_CHECKING:
    from bento.config import Config
    from bento.server import Server
    from bento.sessions import Registry, Session


def installer() -> str | None:
    """The installer of executes' packages: uv beside this interpreter or on PATH (else pip)."""
    return shutil.which("uv", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                    os.environ.get("PATH", "")]))


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


def package_fields(server: Server, asked: list[str]) -> dict:
    """The meta fields of an execute's packages on this server (none: no fields)."""
    if not asked:
        return {}
    try:
        specs = envs.normalise(asked)
    except envs.SpecError as exc:
        raise protocol.RequestError("bad_request", f"packages: {exc}") from None
    python = server.registry.exchanges.python  # (the environments' interpreter: a real path)
    return {"packages": specs, "env_name": envs.env_hash(specs, python),
            "envs_dir": os.path.join(server.store.root, "envs"), "uv": server.uv,
            "max_env_bytes": server.config.max_env_bytes}


def file_fields(config: Config, req: dict) -> dict:
    """The meta fields of an execute's module and files (checked: no path
    leaves the work dir; the sessions module writes them there)."""
    out: dict[str, Any] = {}
    if req.get("module") is not None:
        if not all(part.isidentifier() for part in req["module"].split(".")):
            raise protocol.RequestError("bad_request", f"module {req['module']!r} is not a dotted name")
        out["module"], out["code"] = req["module"], ""
    if req["files"]:
        try:
            out["files"] = files.check_tree(req["files"], config.max_message)
        except files.FileError as exc:
            raise protocol.RequestError(exc.code, f"files: {exc}") from None
    return out


class JobOps:
    if TYPE_CHECKING:  # what bento.server.Connection provides
        server: Server
        config: Config
        registry: Registry

        def by_token(self, token: str, owner: bool) -> tuple[Session, str]: ...

        async def send(self, data: bytes) -> None: ...

    async def op_resize(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=True)
        await self.send(protocol.reply_ok(req["id"], **await resize(self.registry, s, req)))

    async def op_file_get(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=False)
        await self.send(protocol.reply_ok(req["id"], **await file_get(s, req)))

    async def op_file_put(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=True)
        await self.send(protocol.reply_ok(req["id"], **await file_put(self.config, s, req)))


# The three ops on a session of this server, whoever asked (one of its own
# connections, or another cluster node for its client: bento/cluster/control.py);
# each returns its reply's fields or raises the request's error.

async def resize(registry: Registry, s: Session, req: dict) -> dict:
    if s.snap.has_ended:
        raise protocol.RequestError("gone", "the function has ended")
    r = await registry.call(s, {"t": "resize", "rows": req["rows"], "cols": req["cols"]})
    if not r["ok"]:
        raise protocol.RequestError(r["code"], r["message"])
    return {}


async def file_get(s: Session, req: dict) -> dict:
    parts = _path(req)
    size = min(req["length"], files.CHUNK)
    data, total = await _io(files.read_file, os.path.join(s.dir, "work"), parts, req["offset"], size)
    return {"data": data, "size": total}


async def file_put(config: Config, s: Session, req: dict) -> dict:
    parts = _path(req)
    if s.snap.has_ended:
        raise protocol.RequestError("gone", "the function has ended: files go into a running session")
    cap = config.max_upload_bytes
    if req["offset"] + len(req["data"]) > cap:
        raise protocol.RequestError("too_large", f"an uploaded file is at most {cap} bytes on this server")
    size = await _io(files.write_file, os.path.join(s.dir, "work"), parts, req["offset"], req["data"],
                     req["offset"] == 0)
    events.emit("session.file_put", session=s.sid, offset=req["offset"], bytes=len(req["data"]), size=size)
    return {"size": size}
