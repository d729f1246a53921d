"""`list` across a cluster of nodes with API keys: each key sees its own
sessions on every node, an admin key every session, as on one server."""

from __future__ import annotations

import os

import pytest
from helpers import ServerProcess, conn, wait_status

WAITS = "def main():\n    return api.recv()\n"
KEYS = {"alice": ("k-alice", "admin"), "bob": ("k-bob", "user"), "carol": ("k-carol", "user")}


def team_config(tmp_path) -> str:
    """A config file with one key file per named key."""
    text = ['sandbox = "none"']
    for name, (key, role) in KEYS.items():
        path = tmp_path / f"{name}.key"
        path.write_text(key + "\n")
        os.chmod(path, 0o600)
        text.append(f'[keys.{name}]\nkey_file = "{path}"\nrole = "{role}"')
    config = tmp_path / "bento.toml"
    config.write_text("\n".join(text) + "\n")
    return str(config)


@pytest.fixture(scope="module")
def team_nodes(redis_server, tmp_path_factory):
    """Two nodes, ``a`` and ``b``, with the same named keys, on one Redis."""
    config = team_config(tmp_path_factory.mktemp("team"))
    started = []
    try:
        for name in ("a", "b"):
            data = str(tmp_path_factory.mktemp(f"team-{name}") / "data")
            started.append(ServerProcess(data, "--config", config, "--cluster", redis_server.url,
                                         "--node", name).start())
        yield started
    finally:
        for srv in started:
            srv.stop()


async def listed(url: str, auth: str) -> dict[str, dict]:
    async with conn(url, auth=auth) as c:
        return {s["session"]: s for s in (await c.ok("list"))["sessions"]}


async def test_each_key_lists_its_sessions_on_every_node_and_an_admin_all(team_nodes):
    a, b = team_nodes
    runs: dict[str, list[dict]] = {}
    for who, node in (("bob", a), ("bob", b), ("carol", a), ("alice", b)):
        async with conn(node.url, auth=KEYS[who][0]) as c:
            r = await c.ok("execute", code=WAITS, attach=False)
            await wait_status(c, r["token"], lambda st: st["state"] == "running")
            runs.setdefault(who, []).append(r)
    ids = {who: {r["session"] for r in rs} for who, rs in runs.items()}
    for node in (a, b):
        for who in ("bob", "carol"):
            mine = await listed(node.url, KEYS[who][0])
            assert set(mine) == ids[who], (node.url, who, mine)
            assert {s["key"] for s in mine.values()} == {who}
        every = await listed(node.url, "k-alice")
        assert set(every) >= ids["bob"] | ids["carol"] | ids["alice"]
        assert {every[sid]["key"] for sid in ids["bob"]} == {"bob"}
        # A session another node runs is listed with its node and, as in its
        # status there, no attachment count (each node counts its own).
        here = "a" if node is a else "b"
        for s in every.values():
            assert ("node" in s) == (s["attachments"] is None), s
            assert s.get("node", here) in ("a", "b")
    for who, rs in runs.items():
        async with conn(b.url, auth=KEYS[who][0]) as c:
            for r in rs:
                await c.ok("destroy", token=r["token"])
