"""``bento ls``: the sessions this machine knows, and those a server lists for
the caller's API key.

Each server is asked once for its ``list``. A known session the list does not
cover is asked with its token (``status``), unless this machine knows the
server has forgotten it: every ``not_found`` spends the host's allowance of
failed token look-ups, so a session is looked up in vain at most once and
then marked ``cleaned`` in the state file.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import trio

from bento_clients.cli_output import say, show, show_json, unauthorized_message
from bento_clients.cli_settings import Settings
from bento_clients.cli_stream import connect
from bento_clients.errors import ConnectionLost, NotFound, RequestFailed, Unauthorized
from bento_clients.state import key_id

__all__ = ["cmd_ls"]

ENDED = ("exited", "failed", "killed", "lost")
LS_TIMEOUT_S = 3.0  # per server: ls reports an unreachable server rather than waiting for it


def _gone(entry: dict[str, Any]) -> str:
    """The state shown for a session its server has forgotten."""
    last = entry.get("state")
    return f"{last if last in ENDED else 'gone'} (cleaned up)"


def _row(url: str, entry: dict[str, Any] | None, st: dict[str, Any] | None, state: str) -> dict[str, Any]:
    entry, st = entry or {}, st or {}
    return {"session": entry.get("session") or st.get("session"), "name": entry.get("name"),
            "file": entry.get("file"), "created": st.get("created") or entry.get("created"), "server": url,
            "here": bool(entry), "state": state}


async def cmd_ls(settings: Settings, args: argparse.Namespace) -> int:
    state = settings.state
    entries = state.sessions()
    by_server: dict[str, list[dict[str, Any]]] = {settings.server_for(): []}
    for e in entries.values():
        by_server.setdefault(settings.server_for(e), []).append(e)
    rows: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    refused: list[str] = []
    cleaned: list[str] = []  # found forgotten by its server now
    ended = {sid for sid, e in entries.items() if e.get("cleaned")}
    my_key = key_id(settings.api_key)

    async def ask_one(client: Any, url: str, e: dict[str, Any]) -> None:
        token = e.get("token") or e.get("viewer_token")
        if not token:
            rows[e["session"]] = _row(url, e, None, "? (no token known here)")
            return
        try:
            st = await client.status(str(token))
            rows[e["session"]] = _row(url, e, st, str(st.get("state")))
            if st.get("state") in ENDED:
                ended.add(e["session"])
        except NotFound:
            cleaned.append(e["session"])
            rows[e["session"]] = _row(url, e, None, _gone(e))
        except RequestFailed as exc:
            problems.append(f"{url}: status of {e['session']}: {exc.code}: {exc.message}")
            rows[e["session"]] = _row(url, e, None, f"{e.get('state') or '?'} (not asked: {exc.code})")

    async def one_server(url: str, known: list[dict[str, Any]]) -> None:
        listed: list[dict[str, Any]] | None = None
        try:
            async with connect(settings, url, connect_timeout=min(settings.connect_timeout, LS_TIMEOUT_S),
                               reconnect_timeout=LS_TIMEOUT_S) as client:
                try:
                    listed = await client.list()
                except Unauthorized:
                    refused.append(f"{url}: list: {unauthorized_message(settings.api_key is not None)}")
                except RequestFailed as exc:
                    refused.append(f"{url}: list: {exc.code}: {exc.message}")
                for st in listed or []:
                    sid = str(st.get("session"))
                    rows[sid] = _row(url, entries.get(sid), st, str(st.get("state")))
                    if st.get("state") in ENDED:
                        ended.add(sid)
                for e in known:
                    if e["session"] in rows:
                        continue
                    if e.get("cleaned"):
                        rows[e["session"]] = _row(url, e, None, _gone(e))
                    elif listed is not None and e.get("key_id") == my_key:
                        # The list covers every session this key started: it is gone.
                        cleaned.append(e["session"])
                        rows[e["session"]] = _row(url, e, None, _gone(e))
                    else:
                        await ask_one(client, url, e)
        except ConnectionLost as exc:
            problems.append(f"{url}: {exc}")
            for e in known:
                if e["session"] not in rows:
                    rows[e["session"]] = _row(url, e, None, f"{e.get('state') or '?'} (unreachable)")

    async with trio.open_nursery() as nursery:
        for url, known in by_server.items():
            nursery.start_soon(one_server, url, known)
    for sid in cleaned:
        state.update_session(sid, cleaned=True)
    ended.update(cleaned)
    ordered = sorted(rows.values(), key=lambda r: r.get("created") or 0)
    if args.prune:
        forgotten = state.remove_sessions([sid for sid in ended if sid in entries])
        ordered = [r for r in ordered if not (r["here"] and r["session"] in ended)]
    _print_rows(settings, ordered)
    if args.prune:
        say(f"bento: forgot {forgotten} ended session{'' if forgotten == 1 else 's'}")
    for p in problems + refused:
        say(f"bento: {p}")
    return 1 if refused or problems else 0


def _print_rows(settings: Settings, rows: list[dict[str, Any]]) -> None:
    if settings.json:
        show_json(rows)
        return
    if not rows:
        return
    show(f"{'SESSION':<28} {'NAME':<16} {'STATE':<24} {'CREATED':<19} FILE")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) if r.get("created") else "-"
        name = r.get("name") or "-"
        file = os.path.basename(r["file"]) if r.get("file") else "-" if r["here"] else "(not started here)"
        show(f"{r['session']:<28} {name:<16} {str(r.get('state')):<24} {created:<19} {file}")
