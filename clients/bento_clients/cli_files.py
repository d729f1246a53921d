"""The CLI's files: what ``bento run`` sends (a project, ``--file``, ``@path`` arguments)
and ``bento cp`` between this machine and a session's work dir.

Paths on the session's side are relative to its work dir (the function's
working directory); the server refuses any that would leave it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from bento_clients.cli_output import say, show_json
from bento_clients.cli_settings import Settings, UsageError, known_entry, parse_json_arg, token_of
from bento_clients.cli_stream import with_client
from bento_clients.errors import NotFound
from bento_clients.tree import TreeError, pack

__all__ = ["cmd_cp", "run_source"]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def run_source(args: argparse.Namespace) -> tuple[str | None, str | None, dict[str, bytes], list[Any]]:
    """(code, module, files, the entry's arguments) of ``bento run``: TARGET is a
    Python file, or a directory run as ``-m pkg.module[:entry]``; ``--file
    SRC[:DEST]`` adds files (a directory as its tree); an argument ``@path`` is
    the JSON in that file (a large argument never rides on a command line)."""
    files: dict[str, bytes] = {}
    code = module = None
    try:
        if os.path.isdir(args.file):
            if not args.module:
                raise UsageError(f"{args.file} is a directory: say what to run with -m pkg.module[:entry]")
            files.update(pack(args.file, args.exclude))
        elif args.module:
            if not os.path.exists(args.file):
                raise UsageError(f"cannot read {args.file}: no such directory (-m runs a module of a directory)")
            raise UsageError("-m runs a module of a directory: give the directory, not a file")
        else:
            try:
                code = _read(args.file).decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"cannot read {args.file}: it is not UTF-8 text") from None
        for spec in args.add_file:
            src, _, dest = spec.partition(":")
            dest = dest or os.path.basename(os.path.normpath(src))
            if os.path.isdir(src):
                files.update({f"{dest}/{k}": v for k, v in pack(src, args.exclude).items()})
            else:
                files[dest] = _read(src)
    except TreeError as exc:
        raise UsageError(str(exc)) from None
    if args.module:
        module, _, entry = args.module.partition(":")
        if entry:
            args.entry = entry
    fn_args = [parse_json_arg(_read(a[1:]).decode("utf-8", "replace"), a) if a.startswith("@")
               else parse_json_arg(a, f"argument {i + 1}") for i, a in enumerate(args.args)]
    return code, module, files, fn_args


def _remote(spec: str, settings: Settings) -> tuple[str, str] | None:
    """(the session's token, id or name, path) for ``SESSION:path``; None for a
    local path (a name this machine knows counts unless a local file has the whole
    spec as its path)."""
    head, sep, path = spec.partition(":")
    if not sep:
        return None
    if not head.startswith(("bto_", "btv_", "s_")) and (os.path.exists(spec) or settings.state.named(head) is None):
        return None
    if not path:
        raise UsageError(f"{spec!r}: give the file's path after the ':'")
    return head, path


async def cmd_cp(settings: Settings, args: argparse.Namespace) -> int:
    src, dst = _remote(args.src, settings), _remote(args.dst, settings)
    if (src is None) == (dst is None):
        raise UsageError("bento cp copies between this machine and a session: one of SRC and DST is "
                         "SESSION:path (a token, or the id or name of a session this machine knows), "
                         "the other a local path")
    remote = src or dst
    assert remote is not None
    entry = known_entry(settings, remote[0])
    token = token_of(entry, remote[0], owner=dst is not None)
    data = _read(args.src) if dst is not None else b""

    async def go(client: Any) -> int:
        if dst is not None:
            await client.upload(token, dst[1], data)
            size = len(data)
        else:
            try:
                got = await client.download(token, remote[1])
            except NotFound as exc:
                if "no session" in exc.message:
                    raise
                say(f"bento: {exc.message}")  # the file, not the session, is missing
                return 1
            local = args.dst
            if os.path.isdir(local):
                local = os.path.join(local, os.path.basename(remote[1]))
            with open(local, "wb") as f:
                f.write(got)
            size = len(got)
        if settings.json:
            show_json({"bytes": size})
        return 0

    return await with_client(settings, settings.server_for(entry), go)
