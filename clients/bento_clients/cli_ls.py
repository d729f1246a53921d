"""``bento ls``: the sessions this machine knows, and those a server lists for
the caller's API key."""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio

from bento_clients import sdk
from bento_clients.cli_output import say, show, show_json
from bento_clients.cli_settings import CLIENT_NAME, Settings
from bento_clients.errors import ConnectionLost, NotFound, RequestFailed

__all__ = ["cmd_ls"]


async def cmd_ls(settings: Settings, args: argparse.Namespace) -> int:
    entries = list(settings.state.sessions().values())
    by_server: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_server.setdefault(settings.server_for(e), []).append(e)
    if settings.api_key:
        by_server.setdefault(settings.server_for(), [])
    rows: list[dict[str, Any]] = []
    problems: list[str] = []

    async def one_server(url: str, known: list[dict[str, Any]]) -> None:
        try:
            async with sdk.connect(url, settings.api_key, connect_timeout=min(settings.connect_timeout, 3),
                                   reconnect_timeout=3, client_name=CLIENT_NAME) as client:
                for e in known:
                    row = {"session": e["session"], "name": e.get("name"), "created": e.get("created"),
                           "server": url, "here": True}
                    try:
                        st = await client.status(str(e.get("token") or e.get("viewer_token")))
                        row["state"] = st.get("state")
                    except NotFound:
                        row["state"] = f"{e.get('state') or 'ended'} (cleaned up)"
                    rows.append(row)
                if settings.api_key and url == settings.server_for():
                    mine = {e["session"] for e in known}
                    for st in await client.list():
                        if st.get("session") not in mine:
                            rows.append({"session": st.get("session"), "name": None, "created": st.get("created"),
                                         "server": url, "here": False, "state": st.get("state")})
        except (ConnectionLost, RequestFailed) as exc:
            problems.append(f"{url}: {exc}")
            for e in known:
                rows.append({"session": e["session"], "name": e.get("name"), "created": e.get("created"),
                             "server": url, "here": True, "state": (e.get("state") or "?") + " (unreachable)"})

    async with trio.open_nursery() as nursery:
        for url, known in by_server.items():
            nursery.start_soon(one_server, url, known)
    rows.sort(key=lambda r: r.get("created") or 0)
    if settings.json:
        show_json(rows)
    else:
        if rows:
            show(f"{'SESSION':<28} {'STATE':<24} {'CREATED':<19} NAME")
        for r in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) if r.get("created") else "-"
            name = r.get("name") or ("(not started here)" if not r["here"] else "-")
            show(f"{r['session']:<28} {str(r.get('state')):<24} {created:<19} {name}")
    for p in problems:
        say(f"bento: {p}")
    return 0

