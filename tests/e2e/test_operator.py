"""Running Bento for a team: named keys with roles (an admin sees and ends any
session, a user only its own), revocation on SIGHUP, default limits that end a
forgotten job, structured logs without tokens, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import trio
from helpers import ROOT, ServerProcess, conn, wait_exit, wait_status

FOREVER = "def main():\n    while True:\n        pass\n"
WAITS = "def main():\n    return api.recv()\n"
KEYS = {"alice": ("k-alice", "admin"), "bob": ("k-bob", "user"), "carol": ("k-carol", "user")}


def team_config(tmp_path, names=("alice", "bob", "carol"), extra: str = "") -> str:
    """A config file with one key file per named key; rewritten in place for a reload."""
    text = ['sandbox = "none"', extra]
    for name in names:
        key, role = KEYS[name]
        path = tmp_path / f"{name}.key"
        path.write_text(key + "\n")
        os.chmod(path, 0o600)
        text.append(f'[keys.{name}]\nkey_file = "{path}"\nrole = "{role}"')
    config = tmp_path / "bento.toml"
    config.write_text("\n".join(text) + "\n")
    return str(config)


async def err(c, op: str, **fields) -> str:
    r = await c.request(op, **fields)
    assert r["ok"] is False, (op, r)
    return r["error"]["code"]


async def test_admin_lists_and_ends_any_session_a_user_cannot(make_server, tmp_path):
    srv = make_server("--config", team_config(tmp_path))
    async with conn(srv.url, auth="k-bob") as bob:
        run = await bob.ok("execute", code=FOREVER, attach=False)
        sid = run["session"]
        await wait_status(bob, run["token"], lambda st: st["state"] == "running")
    async with conn(srv.url, auth="k-carol") as carol:
        assert [s["session"] for s in (await carol.ok("list"))["sessions"]] == []
        for op, fields in (("status", {}), ("signal", {"signal": "KILL"}), ("destroy", {})):
            assert await err(carol, op, session=sid, **fields) == "forbidden", op
    async with conn(srv.url, auth="k-alice") as alice:
        listed = {s["session"]: s for s in (await alice.ok("list"))["sessions"]}
        assert listed[sid]["key"] == "bob" and listed[sid]["state"] == "running", listed
        assert (await alice.ok("status", session=sid))["key"] == "bob"
        assert await err(alice, "status", session="s_000000000000000000000000") == "not_found"
        await alice.ok("destroy", session=sid)
    async with conn(srv.url, auth="k-bob") as bob:
        # The owner sees why the session ended.
        st = await wait_exit(bob, run["token"])
        assert st["state"] == "killed", st
        assert st["exit"]["error"]["type"] == "Killed" and st["exit"]["error"]["by"] == "admin:alice", st
        await bob.ok("destroy", token=run["token"])


async def test_admin_signal_by_id_and_user_token_paths_stay(make_server, tmp_path):
    srv = make_server("--config", team_config(tmp_path))
    async with conn(srv.url, auth="k-bob") as bob:
        run = await bob.ok("execute", code=WAITS, attach=False)
        # Only admins name sessions by id, whatever the session.
        assert await err(bob, "status", session=run["session"]) == "forbidden"
        assert (await bob.ok("status", token=run["token"]))["session"] == run["session"]
    async with conn(srv.url, auth="k-alice") as alice:
        await wait_status(alice, run["token"], lambda st: st["state"] == "running")
        await alice.ok("signal", session=run["session"], signal="KILL")
        st = await wait_exit(alice, run["token"])
        assert st["exit"]["error"]["by"] == "admin:alice", st


async def test_admin_status_and_destroy_of_an_ended_session_served_from_disk(make_server, tmp_path):
    srv = make_server("--config", team_config(tmp_path))
    async with conn(srv.url, auth="k-bob") as bob:
        run = await bob.ok("execute", code="def main():\n    return 7\n", attach=False)
        await wait_exit(bob, run["token"])
    sdir = os.path.join(srv.data_dir, "sessions", run["session"])
    with trio.fail_after(20):
        # Its exchange exits once the end is on disk; the server serves it from there.
        while os.path.exists(os.path.join(sdir, "ctl.sock")):
            await trio.sleep(0.05)
    async with conn(srv.url, auth="k-alice") as alice:
        st = await alice.ok("status", session=run["session"])
        assert st["key"] == "bob" and st["state"] == "exited" and st["exit"]["result"] == 7, st
        assert await err(alice, "signal", session=run["session"], signal="KILL") == "gone"
        await alice.ok("destroy", session=run["session"])
        assert await err(alice, "status", session=run["session"]) == "not_found"
    assert not os.path.exists(sdir)
    assert 'why="destroyed by admin:alice"' in srv.read_log()


async def test_removing_a_key_and_sighup_revokes_it_and_its_sessions(make_server, tmp_path):
    config = team_config(tmp_path)
    srv = make_server("--config", config)
    async with conn(srv.url, auth="k-bob") as bob, conn(srv.url, auth="k-carol") as carol:
        mine = await bob.ok("execute", code=WAITS, attach=False)
        theirs = await carol.ok("execute", code=WAITS, attach=False)
        team_config(tmp_path, names=("alice", "carol"))
        srv.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while "server.reloaded" not in srv.read_log():
                await trio.sleep(0.05)
        # Bob's open connection, his key and his session's tokens are all cut off.
        assert await err(bob, "list") == "unauthorized"
        assert await err(bob, "status", token=mine["token"]) == "unauthorized"
        refused = (await carol.request("status", token=mine["viewer_token"]))["error"]
        assert refused["code"] == "unauthorized" and refused.get("revoked") is True, refused
        # The CLI says the session's key was revoked, not that carol's was refused.
        cli = subprocess.run([sys.executable, "-m", "bento.app", "status", mine["viewer_token"], "--server", srv.url,
                              "--api-key", "k-carol", "--state-file", str(tmp_path / "state.json")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
        assert cli.returncode != 0 and "started this session was revoked" in cli.stderr, cli.stderr
        assert (await carol.ok("status", token=theirs["token"]))["state"] in ("starting", "running")
    async with conn(srv.url, auth="k-bob") as bob:
        assert await err(bob, "execute", code=WAITS) == "unauthorized"
    async with conn(srv.url, auth="k-alice") as alice:
        assert (await alice.ok("status", session=mine["session"]))["key"] == ""
        await alice.ok("destroy", session=mine["session"])
    assert "revoked=bob" in srv.read_log() and "k-bob" not in srv.read_log()


async def test_revoke_sessions_false_keeps_the_sessions_tokens(make_server, tmp_path):
    config = team_config(tmp_path, extra="revoke_sessions = false")
    srv = make_server("--config", config)
    async with conn(srv.url, auth="k-bob") as bob:
        mine = await bob.ok("execute", code=WAITS, attach=False)
        team_config(tmp_path, names=("alice",), extra="revoke_sessions = false")
        srv.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while "server.reloaded" not in srv.read_log():
                await trio.sleep(0.05)
        assert await err(bob, "list") == "unauthorized"
        assert (await bob.ok("status", token=mine["token"]))["session"] == mine["session"]


async def test_a_forgotten_loop_ends_at_the_default_wall_limit(make_server):
    srv = make_server("--sandbox", "none")
    async with conn(srv.url) as c:
        run = await c.ok("execute", code=FOREVER, attach=False)
        st = await wait_status(c, run["token"], lambda st: st["state"] == "running")
        assert "wall_s" in st["enforced"] and "cpu_s" in st["enforced"], st
        await c.ok("signal", token=run["token"], signal="KILL")
    srv = make_server("--sandbox", "none", "--default-limit", "wall_s=1s")
    async with conn(srv.url) as c:
        run = await c.ok("execute", code=FOREVER, attach=False)
        st = await wait_exit(c, run["token"], timeout=20)
        assert st["state"] == "killed" and st["exit"]["error"]["message"] == "wall_s", st


async def test_json_log_has_every_session_event_and_no_token(make_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k-json\n")
    os.chmod(keys, 0o600)
    srv = make_server("--sandbox", "none", "--log-format", "json", "--api-key-file", str(keys),
                      "--max-message", "64K")
    tokens = []
    async with conn(srv.url, auth="k-json") as c:
        r = await c.ok("execute", code="def main():\n    print('hi')\n    return 1\n")
        tokens += [r["token"], r["viewer_token"]]
        frames = await c.frames(r["session"])
        await c.send({"op": "ack", "session": r["session"], "seq": frames[-1][0]})
        w = await c.ok("execute", code=WAITS, attach=False)
        tokens += [w["token"], w["viewer_token"]]
        await wait_status(c, w["token"], lambda st: st["state"] == "running")
        await c.ok("destroy", token=w["token"])
    async with conn(srv.url, hello=False) as c:
        r = await c.request("hello", proto=1, auth="not-a-key")
        assert r["ok"]
    async with conn(srv.url, auth="k-json") as c:
        await c.send({"op": "ping", "id": 1, "pad": b"x" * (65 * 1024)})
        with trio.fail_after(10):
            while "too_large" not in srv.read_log():
                await trio.sleep(0.05)
    srv.kill(signal.SIGTERM)
    assert srv.proc.returncode == 0
    lines = [json.loads(line) for line in srv.read_log().splitlines() if line.strip()]
    seen = [(e.get("event"), e.get("state"), e.get("why"), e.get("what")) for e in lines]
    names = {e[0] for e in seen}
    assert {"server.started", "session.created", "session.state", "session.ended", "refused",
            "server.stopped"} <= names, seen
    assert ("session.state", "exited", None, None) in seen, seen
    # Both executes' lines: the attached one's are written after its first output.
    assert sum(e[0] == "session.created" for e in seen) == 2, seen
    assert ("refused", None, None, "bad_key") in seen and ("refused", None, None, "too_large") in seen, seen
    assert any(e[0] == "session.ended" and e[2] == "destroyed by owner" for e in seen), seen
    text = srv.read_log()
    assert "bto_" not in text and "btv_" not in text and "k-json" not in text
    assert not any(t in text for t in tokens)


async def test_an_attached_execute_without_output_still_logs_its_lines_while_it_runs(make_server):
    # An attached execute's lines wait for its first out event, so that they do not
    # delay it, but only a moment (bento/server_attach.py LINES_WAIT_S).
    srv = make_server("--sandbox", "none")
    async with conn(srv.url) as c:
        r = await c.ok("execute", code=WAITS)
        with trio.fail_after(10):
            while f"session.created session={r['session']}" not in srv.read_log():
                await trio.sleep(0.05)
        assert f"audit op=execute key=- session={r['session']}" in srv.read_log()
        assert (await c.ok("status", token=r["token"]))["exit"] is None  # (still waiting for its input)
        await c.ok("destroy", token=r["token"])


def test_ctrl_c_stops_with_one_line_and_no_traceback(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "--sandbox", "none").start()
    try:
        srv.kill(signal.SIGINT)
        assert srv.proc.returncode in (0, 130), srv.proc.returncode
        log = srv.read_log()
        assert "Traceback" not in log and "BaseExceptionGroup" not in log, log
        assert "server.stopped signal=INT" in log, log
    finally:
        srv.stop()


def test_make_run_args_override_host_and_port():
    r = subprocess.run(["make", "-n", "run", 'ARGS=--port 18769 --host ::1'], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    cmd = [line for line in r.stdout.splitlines() if "bento.app server" in line]
    assert cmd and "--port 18769" in cmd[0] and "8765" not in cmd[0] and "127.0.0.1" not in cmd[0], r.stdout
    r = subprocess.run(["make", "-n", "run"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert "--host 127.0.0.1 --port 8765" in r.stdout, r.stdout
