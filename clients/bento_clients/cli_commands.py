"""The CLI's commands about one session: run, attach, logs, send, status, kill,
rm, share, tokens. Each is ``async def cmd_x(settings, args) -> exit code``; ``cli``
parses the arguments and dispatches here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import trio

from bento_clients.cli_files import run_source
from bento_clients.cli_output import QueueLine, exit_code, say, show, show_json, status_lines
from bento_clients.cli_settings import Settings, UsageError, known_entry, parse_json_arg, token_of
from bento_clients.cli_stream import follow, window, with_client
from bento_clients.convert import from_json, parse_buffer, parse_limits
from bento_clients.errors import Forbidden, Gone, NotFound, RequestFailed
from bento_clients.state import NameTaken, check_name, key_id
from bento_clients.terminal import ResumeFilter, Sinks

__all__ = ["cmd_attach", "cmd_kill", "cmd_logs", "cmd_rm", "cmd_run", "cmd_send", "cmd_share", "cmd_status",
           "cmd_tokens"]


STDIN_PIECE = 256 * 1024


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    code, module, files, fn_args = run_source(args)
    kwargs: dict[str, Any] = {}
    for kv in args.kwarg:
        name, sep, value = kv.partition("=")
        if not sep or not name:
            raise UsageError(f"bad --kwarg {kv!r}: expected NAME=JSON")
        kwargs[name] = parse_json_arg(value, f"--kwarg {name}")
    env: dict[str, str] = {"TERM": os.environ.get("TERM", "xterm-256color")} if args.tty else {}
    for kv in args.env:
        name, sep, value = kv.partition("=")
        if not sep or not name:
            raise UsageError(f"bad --env {kv!r}: expected NAME=VALUE")
        env[name] = value
    try:
        limits = parse_limits(",".join(args.limit)) if args.limit else None
        buffer = parse_buffer(args.buffer, args.policy)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    packages = list(args.pip) + (read_requirements(args.requirements) if args.requirements else [])
    url = settings.server_for()
    state = settings.state
    if args.name is not None:
        try:
            check_name(args.name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        taken = state.named(args.name)
        if taken is not None:
            raise UsageError(f"{NameTaken(args.name, taken)}: pick another name, or forget that session "
                             f"(bento ls --prune forgets ended ones; bento rm {args.name} destroys it)")

    async def go(client: Any) -> int:
        client.on_queued = queue_line = QueueLine()
        try:
            s = await client.execute(
                code, *fn_args, entry=args.entry, kwargs=kwargs, env=env or None, limits=limits,
                buffer=buffer, network=args.network, packages=packages, files=files, module=module,
                tty=window() if args.tty else None, idempotency_key=args.idempotency_key,
                attach=not args.detach, wait=args.wait)
        finally:
            queue_line.done()
        entry = {"session": s.id, "server": url, "token": s.token, "viewer_token": s.viewer_token,
                 "name": args.name, "file": args.file, "key_id": key_id(settings.api_key),
                 "buffer": buffer}
        try:
            state.add_session(entry)
        except NameTaken as exc:  # another bento took the name since the check above
            state.add_session({**entry, "name": None})
            say(f"bento: warning: {exc}; session {s.id} is recorded here without a name")
        if args.detach:
            if settings.json:
                show_json({"session": s.id, "token": s.token, "viewer_token": s.viewer_token, "name": args.name})
            else:
                show(_tokens_text({**entry, "name": args.name}))
            return 0
        s.input_journal = state.journal(s.id)
        return await follow(settings, s, attached=True, stdin=not args.no_stdin, traceback=args.traceback,
                            to_recv=args.recv, tty=args.tty, file=args.file)

    return await with_client(settings, url, go)



def read_requirements(path: str) -> list[str]:
    """The requirements of a requirements file: one per line, without comments
    and blank lines. Options (``-r``, ``-e``, ``--index-url`` ...) are refused:
    the server installs plain requirements from its own index only."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line.startswith("-"):
            raise UsageError(f"{path}:{n}: {line!r}: options are not supported, only requirements "
                             "like 'pandas<3'")
        if line:
            out.append(line)
    return out


async def cmd_attach(settings: Settings, args: argparse.Namespace) -> int:
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token)
    state = settings.state
    if args.from_seq is None and entry is not None and entry.get("exit"):
        # Everything, exit frame included, was already printed here.
        data = from_json(entry["exit"])
        if sys.stderr.isatty():
            say(f"bento: session {entry['session']} has ended ({data.get('state')}); its output was printed")
        return exit_code(data)
    if args.from_seq is not None:
        from_seq, resume_sizes = args.from_seq, None
    elif entry is not None:
        from_seq, resume_sizes = int(entry.get("delivered", 0)) + 1, entry.get("sinks") or {}
    else:
        from_seq, resume_sizes = 1, None
    pending = state.pending_input(entry["session"]) if entry else []

    async def go(client: Any) -> int:
        s = await client.attach(token, from_seq, pending_input=pending,
                                input_journal=state.journal(entry["session"]) if entry else None)
        state.add_session({"session": s.id, "server": settings.server_for(entry), "token": s.token,
                           "viewer_token": s.viewer_token})
        if entry is None and s.mode == "rw":
            s.input_journal = state.journal(s.id)
        resume = ResumeFilter(Sinks(), resume_sizes) if resume_sizes else None
        return await follow(settings, s, attached=True, stdin=not args.no_stdin, traceback=args.traceback,
                            resume=resume, to_recv=args.recv, tty=args.tty, file=(entry or {}).get("file"))

    return await with_client(settings, settings.server_for(entry), go)


async def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token)

    async def go(client: Any) -> int:
        s = await client.attach(token, args.from_seq, auto_ack=False)
        stop_at = None if args.follow else int(s.attach_info.get("next_seq", 1)) - 1
        if stop_at is not None and stop_at < args.from_seq:
            return 0  # nothing retained from there
        code = await follow(settings, s, attached=False, stdin=False, traceback=args.traceback,
                            stop_at=stop_at, file=(entry or {}).get("file"))
        return code if args.follow else 0

    return await with_client(settings, settings.server_for(entry), go)


async def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    if args.eof == (args.value is not None):
        raise UsageError("bento send: give either VALUE or --eof")
    value: Any = None
    if args.stdin and args.value == "-":
        value = sys.stdin.buffer.read()
    elif args.stdin and not args.eof:
        value = (args.value + "\n").encode("utf-8")
    elif not args.eof:
        value = args.value if args.text else parse_json_arg(args.value, "VALUE")
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token, owner=True)
    state = settings.state

    async def go(client: Any) -> int:
        pending = state.pending_input(entry["session"]) if entry else []
        s = await client.attach(token, None, auto_ack=False, pending_input=pending)
        if s.mode != "rw":
            raise Forbidden("forbidden", "sending input needs the owner token (bto_...), not a viewer token")
        state.add_session({"session": s.id, "server": settings.server_for(entry), "token": s.token})
        s.input_journal = state.journal(s.id)
        if args.stdin and args.eof:
            seq = await s.close_stdin()
        elif args.stdin:
            # In pieces well under any server's max_message; each is one input.
            for at in range(0, max(len(value), 1), STDIN_PIECE):
                seq = await s.write_stdin(value[at : at + STDIN_PIECE])
        else:
            seq = await (s.close_input() if args.eof else s.send(value))
        with trio.fail_after(max(settings.reconnect_timeout, 10)):
            await s.wait_input_acked()
        await s.detach()
        if settings.json:
            show_json({"session": s.id, "seq": seq, "accepted": True})
        return 0

    return await with_client(settings, settings.server_for(entry), go)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token)

    async def go(client: Any) -> int:
        try:
            st = await client.status(token)
        except NotFound as exc:
            if exc.details.get("replaced") is True:
                raise  # the session is there; this viewer token no longer reaches it
            if entry is not None and settings.server_for(entry) == entry.get("server"):
                # Its own server has forgotten it: ls will not spend a look-up on it again.
                settings.state.update_session(entry["session"], cleaned=True)
            if entry is None or not entry.get("exit"):
                raise
            ex = from_json(entry["exit"])
            st = {"session": entry["session"], "state": ex.get("state"), "created": entry.get("created"),
                  "exit": ex, "known": "locally only (the server has forgotten it)"}
            if settings.json:
                show_json(st)
            else:
                show(f"session   {st['session']}\nstate     {st['state']} (known here only; the server "
                       f"has cleaned it up)\nexit      code {exit_code(ex)}")
            return 0
        settings.state.update_session(st["session"], state=st.get("state"))
        if settings.json:
            show_json(st)
        else:
            show(status_lines(st, entry))
        return 0

    return await with_client(settings, settings.server_for(entry), go)


async def _new_viewer(settings: Settings, args: argparse.Namespace) -> int:
    """``share --rotate`` / ``--revoke``: the server replaces the viewer token; the state file follows."""
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token, owner=True)

    async def go(client: Any) -> int:
        try:
            viewer = await client.share(token, "rotate" if args.rotate else "revoke")
        except RequestFailed as exc:
            if exc.code != "unavailable" or "viewer_token" not in exc.details:
                raise
            # Replaced all the same (a cluster whose Redis is out of reach): keep the new one.
            viewer = exc.details["viewer_token"]
            say(f"bento: warning: {exc.message}")
        if entry is not None:
            settings.state.update_session(entry["session"], durable=True, viewer_token=viewer)
        if settings.json:
            show_json({"viewer_token": viewer})
        elif viewer is not None:
            show(viewer)
        else:
            say("bento: the viewer token is revoked; nobody can watch this session but its owner")
        return 0

    return await with_client(settings, settings.server_for(entry), go)


async def cmd_kill(settings: Settings, args: argparse.Namespace) -> int:
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token, owner=True)

    async def go(client: Any) -> int:
        try:
            await client.signal(token, args.signal)
        except Gone:
            say("bento: the function has already ended")
            return 1
        if settings.json:
            show_json({"signal": args.signal, "sent": True})
        return 0

    return await with_client(settings, settings.server_for(entry), go)


async def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    entry = known_entry(settings, args.token)
    token = token_of(entry, args.token, owner=True)

    async def go(client: Any) -> int:
        try:
            await client.destroy(token)
        except NotFound:
            if entry is None:
                raise
            say("bento: the server no longer knows this session; forgotten here")
        if entry is not None:
            settings.state.remove_session(entry["session"])
        if settings.json:
            show_json({"destroyed": True})
        return 0

    return await with_client(settings, settings.server_for(entry), go)


def _tokens_text(entry: dict[str, Any]) -> str:
    """The lines that hand out a session's tokens (``run -d``, ``tokens``)."""
    word = entry.get("name") or entry.get("token") or entry.get("viewer_token")
    rows = [("session", entry.get("session")), ("name", entry.get("name")), ("server", entry.get("server")),
            ("token", entry.get("token")), ("viewer token", entry.get("viewer_token"))]
    lines = [f"{k:<13} {v}" for k, v in rows if v]
    if entry.get("token"):
        lines.append(f"attach with:  bento attach {word}")
    if entry.get("viewer_token"):
        lines.append(f"share with:   bento logs -f {entry['viewer_token']}")
    return "\n".join(lines)


async def cmd_tokens(settings: Settings, args: argparse.Namespace) -> int:
    entry = settings.state.find(args.token)
    if entry is None:
        raise UsageError(f"{args.token!r} is no session this machine knows (see bento ls)")
    if settings.json:
        show_json({k: entry.get(k) for k in ("session", "name", "server", "token", "viewer_token")})
    else:
        show(_tokens_text(entry))
    return 0


async def cmd_share(settings: Settings, args: argparse.Namespace) -> int:
    if args.rotate or args.revoke:
        return await _new_viewer(settings, args)
    if args.token.startswith("btv_"):
        viewer: str | None = args.token
    else:
        entry = settings.state.find(args.token)
        viewer = entry.get("viewer_token") if entry else None
        if viewer is None:
            raise UsageError("this machine does not know that session's viewer token "
                             "(the server hands it out only when the session starts)")
    if settings.json:
        show_json({"viewer_token": viewer})
    else:
        show(str(viewer))
    return 0
