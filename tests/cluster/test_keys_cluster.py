"""API keys in a cluster: a key removed from the nodes' config (and SIGHUP)
takes its sessions' tokens away on every node, not only on the one that runs
the session; another key's sessions go on as before."""

from __future__ import annotations

import os
import signal

import trio
from helpers import ServerProcess, connect, wait_status

WAITS = "def main():\n    return api.recv()\n"


def team_config(path, names: tuple[str, ...]) -> str:
    """A config with a user key per name (key ``k-<name>``), rewritten in place for a reload."""
    text = ['sandbox = "none"']
    for name in names:
        key_file = path.parent / f"{name}.key"
        key_file.write_text(f"k-{name}\n")
        os.chmod(key_file, 0o600)
        text.append(f'[keys.{name}]\nkey_file = "{key_file}"\nrole = "user"')
    path.write_text("\n".join(text) + "\n")
    return str(path)


async def test_a_revoked_key_takes_its_sessions_tokens_away_on_every_node(redis_server, tmp_path):
    config = team_config(tmp_path / "bento.toml", ("bob", "carol"))
    a = ServerProcess(str(tmp_path / "a"), "--config", config, "--cluster", redis_server.url, "--node", "ka").start()
    b = ServerProcess(str(tmp_path / "b"), "--config", config, "--cluster", redis_server.url, "--node", "kb").start()
    try:
        async with connect(a.url, auth="k-bob") as bob, connect(a.url, auth="k-carol") as carol:
            mine = await bob.ok("execute", code=WAITS, attach=False)
            theirs = await carol.ok("execute", code=WAITS, attach=False)
        async with connect(b.url, auth="k-carol") as c:
            await wait_status(c, mine["token"], lambda st: st["state"] == "running")
            team_config(tmp_path / "bento.toml", ("carol",))
            for srv in (a, b):
                srv.proc.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                while not all("server.reloaded" in srv.read_log() for srv in (a, b)):
                    await trio.sleep(0.05)
            for op, fields in (("status", {}), ("attach", {"from": 1}), ("state_get", {}),
                               ("file_get", {"path": "x"})):
                for token in (mine["token"], mine["viewer_token"]):
                    refused = (await c.request(op, token=token, **fields))["error"]
                    assert refused["code"] == "unauthorized" and refused.get("revoked") is True, (op, refused)
            assert (await c.ok("status", token=theirs["token"]))["state"] == "running"
            await c.ok("destroy", token=theirs["token"])
    finally:
        a.stop()
        b.stop()
