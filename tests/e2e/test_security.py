"""End-to-end security: API keys, refusing unsafe listening, TLS, session
tokens (never on disk, 256 bits, rate-limited guessing) and what a viewer
token cannot do. Each behaviour is the one PROTOCOL.md promises."""

from __future__ import annotations

import base64
import os
import re
import secrets
import ssl
import stat
import subprocess
import sys
from typing import Any

import pytest
import trio
from helpers import ROOT, Client, assert_contiguous, conn, data_of, self_signed

# --------------------------------------------------------------------------
# Helpers local to this file.


async def err(c: Client, op: str, **fields: Any) -> str:
    """The error code of a request that must fail."""
    r = await c.request(op, **fields)
    assert r["ok"] is False, (op, r)
    assert isinstance(r["error"]["message"], str)
    return r["error"]["code"]


async def still_open(c: Client) -> None:
    r = await c.request("ping", timeout=5)
    assert r == {"id": r["id"], "ok": True}, r


ECHO = '''
def main():
    out = []
    while True:
        try:
            v = api.recv()
        except EOFError:
            return out
        out.append(v)
        print("got", v, flush=True)
'''

WAIT = "def main():\n    print('up', flush=True)\n    return api.recv()\n"


def token_secret(token: str) -> bytes:
    """The random part of a token: base64url after the 4-character prefix."""
    body = token[4:]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", body), token
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


# --------------------------------------------------------------------------
# API keys.


async def test_api_keys_gate_store_execute_list_only(make_server):
    srv = make_server("--api-key", "k1", "--api-key", "k2")
    code = "def main(x):\n    return x + 1\n"
    async with conn(srv.url) as anon, conn(srv.url, auth="k3-wrong") as wrong, \
            conn(srv.url, auth="k1") as c1, conn(srv.url, auth="k2") as c2:
        # Without a key or with a wrong one: unauthorized, and the connection stays open.
        for c in (anon, wrong):
            assert await err(c, "store", name="f", code=code) == "unauthorized"
            await still_open(c)
            assert await err(c, "execute", code=code, args=[1]) == "unauthorized"
            await still_open(c)
            assert await err(c, "list") == "unauthorized"
            await still_open(c)
        # With a key: everything works.
        fid = (await c1.ok("store", name="f", code=code))["function"]
        r1 = await c1.ok("execute", function=fid, args=[1])
        assert (await c1.frames(r1["session"]))[-1][2]["result"] == 2
        # The anonymous connection could not run the stored function either.
        assert await err(anon, "execute", function=fid, args=[1]) == "unauthorized"
        r1b = await c1.ok("execute", code=WAIT, attach=False)
        r2 = await c2.ok("execute", code=WAIT, attach=False)
        # list shows only the caller's own sessions.
        l1 = {s["session"] for s in (await c1.ok("list"))["sessions"]}
        l2 = {s["session"] for s in (await c2.ok("list"))["sessions"]}
        assert {r1["session"], r1b["session"]} <= l1, l1
        assert r2["session"] not in l1, l1
        assert l2 == {r2["session"]}, l2
        for s in (await c1.ok("list"))["sessions"]:
            assert "token" not in s and "viewer_token" not in s, s
        # Tokens are the capability: a connection with no API key attaches,
        # reads status and state, sends input and destroys.
        a = await anon.ok("attach", token=r2["token"])
        assert a["mode"] == "rw" and a["session"] == r2["session"]
        assert (await anon.ok("status", token=r2["viewer_token"]))["session"] == r2["session"]
        assert (await anon.ok("state_get", token=r2["viewer_token"]))["version"] == 0
        assert (await anon.ok("state_put", token=r2["token"], value={"a": 1}))["version"] == 1
        await anon.send({"op": "input", "session": r2["session"], "seq": 1, "data": "hi"})
        assert (await anon.event(ev="in_ack", session=r2["session"]))["seq"] == 1
        frames = await anon.frames(r2["session"])
        assert frames[-1][2]["result"] == "hi"
        v = await wrong.ok("attach", token=r1b["viewer_token"])
        assert v["mode"] == "ro"
        await wrong.ok("signal", token=r1b["token"], signal="TERM")
        assert (await wrong.frames(r1b["session"]))[-1][2]["state"] == "killed"
        await anon.ok("destroy", token=r1b["token"])


async def test_idempotency_keys_are_scoped_by_api_key(make_server):
    srv = make_server("--api-key", "k1", "--api-key", "k2")
    async with conn(srv.url, auth="k1") as c1, conn(srv.url, auth="k2") as c2:
        a = await c1.ok("execute", code=WAIT, idempotency_key="job", attach=False)
        again = await c1.ok("execute", code=WAIT, idempotency_key="job", attach=False)
        b = await c2.ok("execute", code=WAIT, idempotency_key="job", attach=False)
        assert again["session"] == a["session"] and again["token"] == a["token"]
        assert b["session"] != a["session"]
        assert b["token"] != a["token"] and b["viewer_token"] != a["viewer_token"]
        assert a["session"] not in {s["session"] for s in (await c2.ok("list"))["sessions"]}
        for r in (a, b):
            await c1.ok("destroy", token=r["token"])


async def test_bento_api_keys_env(make_server, monkeypatch):
    monkeypatch.setenv("BENTO_API_KEYS", "e1, e2")
    srv = make_server()
    code = "def main():\n    return 'ok'\n"
    async with conn(srv.url) as anon, conn(srv.url, auth="e1, e2") as whole:
        for c in (anon, whole):
            assert await err(c, "execute", code=code) == "unauthorized"
            assert await err(c, "list") == "unauthorized"
            await still_open(c)
    for key in ("e1", "e2"):
        async with conn(srv.url, auth=key) as c:
            r = await c.ok("execute", code=code)
            assert (await c.frames(r["session"]))[-1][2]["result"] == "ok"
            assert [s["session"] for s in (await c.ok("list"))["sessions"]] == [r["session"]]


# --------------------------------------------------------------------------
# Refusing to listen unsafely.


def run_server_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BENTO_API_KEYS"}
    return subprocess.run(
        [sys.executable, "-m", "bento.app", "server", *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
    )


def test_refuses_public_address_without_api_keys(tmp_path):
    for host in ("0.0.0.0", "::"):
        p = run_server_cmd("--host", host, "--port", "0", "--data-dir", str(tmp_path / "d"))
        assert p.returncode != 0, (p.returncode, p.stdout, p.stderr)
        assert b"listening on" not in p.stdout
        msg = p.stderr.decode(errors="replace")
        # Clear: it says what is missing and how to proceed.
        assert "api key" in msg.lower() or "--api-key" in msg, msg
        assert "--insecure" in msg, msg
        assert "Traceback" not in msg, msg
    # A TLS certificate without its key is refused too, with a message.
    p = run_server_cmd("--port", "0", "--data-dir", str(tmp_path / "d"), "--tls-cert", "c.pem")
    assert p.returncode != 0 and b"listening on" not in p.stdout
    assert b"--tls-key" in p.stderr and b"Traceback" not in p.stderr, p.stderr


async def test_public_address_with_insecure_or_api_key_starts(make_server):
    # Listens on every address; we only ever connect to 127.0.0.1.
    srv = make_server("--host", "0.0.0.0", "--insecure")
    assert srv.url.startswith("ws://127.0.0.1:")
    async with conn(srv.url) as c:
        r = await c.ok("execute", code="def main():\n    return 5\n")
        assert (await c.frames(r["session"]))[-1][2]["result"] == 5
    srv = make_server("--host", "0.0.0.0", "--api-key", "pub")
    async with conn(srv.url) as c:
        assert await err(c, "execute", code="def main():\n    return 5\n") == "unauthorized"
    async with conn(srv.url, auth="pub") as c:
        r = await c.ok("execute", code="def main():\n    return 6\n")
        assert (await c.frames(r["session"]))[-1][2]["result"] == 6


# --------------------------------------------------------------------------
# TLS.


async def test_tls_end_to_end(make_server, tmp_path):
    cert, key = self_signed(tmp_path)
    srv = make_server("--tls-cert", cert, "--tls-key", key)
    url = f"wss://127.0.0.1:{srv.port}/v1"
    ctx = ssl.create_default_context(cafile=cert)
    async with conn(url, ssl_context=ctx) as c:
        r = await c.ok("execute", code=ECHO)
        sid = r["session"]
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "over tls"})
        await c.send({"op": "input", "session": sid, "seq": 2, "eof": True})
        frames = await c.frames(sid)
    assert_contiguous(frames)
    assert data_of(frames) == b"got over tls\n"
    assert frames[-1][2]["result"] == ["over tls"]
    # Re-attach over a second TLS connection with the token.
    async with conn(url, ssl_context=ctx) as c:
        await c.ok("attach", token=r["viewer_token"])
        assert await c.frames(sid) == frames

    # A client that does not trust the certificate cannot complete the handshake.
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", srv.port, ssl_context=ssl.create_default_context())
    try:
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
            await stream.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError), info.value.__cause__
    finally:
        await stream.aclose()
    # Plain TCP with no TLS gets no WebSocket: the server never answers 101.
    tcp = await trio.open_tcp_stream("127.0.0.1", srv.port)
    try:
        await tcp.send_all(
            b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        got = b""
        with trio.move_on_after(1):
            while True:
                try:
                    chunk = await tcp.receive_some(4096)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                got += chunk
        assert b"101" not in got.split(b"\r\n", 1)[0], got
    finally:
        await tcp.aclose()
    # And the server still serves TLS clients afterwards.
    async with conn(url, ssl_context=ctx) as c:
        await still_open(c)


# --------------------------------------------------------------------------
# Tokens.


def files_under(top: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                with open(path, "rb") as f:
                    out[path] = f.read()
            except FileNotFoundError:
                continue
    return out


async def test_tokens_never_written_to_disk(make_server):
    srv = make_server()
    tokens: list[str] = []
    sids: list[str] = []

    def keep(r: dict) -> dict:
        tokens.extend((r["token"], r["viewer_token"]))
        sids.append(r["session"])
        return r

    async with conn(srv.url) as c, conn(srv.url) as other:
        # A plain session, attached, with input, ending.
        a = keep(await c.ok("execute", code=ECHO))
        for seq, v in enumerate(("one", "two"), 1):
            await c.send({"op": "input", "session": a["session"], "seq": seq, "data": v})
        await c.send({"op": "input", "session": a["session"], "seq": 3, "eof": True})
        fa = await c.frames(a["session"])
        assert fa[-1][2]["result"] == ["one", "two"]
        # Two idempotent sessions (derived tokens), one retried.
        b = keep(await c.ok("execute", code=WAIT, idempotency_key="idem-b", attach=False))
        assert (await c.ok("execute", code=WAIT, idempotency_key="idem-b", attach=False))["token"] == b["token"]
        d = keep(await c.ok("execute", code=WAIT, idempotency_key="idem-d"))
        # Attaches with both tokens, input, state, status, signal.
        await other.ok("attach", token=b["token"])
        await other.ok("attach", token=d["viewer_token"])
        await other.ok("state_put", token=b["token"], value={"score": 1})
        await other.ok("state_put", token=b["token"], value={"score": 2}, if_version=1)
        await other.ok("state_get", token=b["viewer_token"])
        await other.ok("status", token=b["viewer_token"])
        await other.send({"op": "input", "session": b["session"], "seq": 1, "data": "b-in"})
        fb = await other.frames(b["session"])
        assert fb[-1][2]["result"] == "b-in"
        await other.send({"op": "ack", "session": b["session"], "seq": fb[-1][0] - 1})
        await c.ok("signal", token=d["token"], signal="KILL")
        await c.frames(d["session"])
        e = keep(await c.ok("execute", code=WAIT, attach=False))
        await c.ok("state_put", token=e["token"], value=[1, 2, 3])
        await c.ok("attach", token=e["viewer_token"])
        await still_open(c)
        await still_open(other)
        await trio.sleep(0.5)  # let the exchanges flush state and logs
        on_disk = files_under(srv.data_dir)
    srv.kill()  # SIGKILL: whatever is on disk now is what a crash leaves
    await trio.sleep(0.2)
    on_disk.update(files_under(srv.data_dir))
    with open(srv.log_path, "rb") as f:
        on_disk[srv.log_path] = f.read()

    assert len(tokens) == 8 and len(set(tokens)) == 8
    # The scan is real: the public session ids are in there.
    blob = b"\0".join(on_disk.values())
    for sid in sids:
        assert sid.encode() in blob, sid
    for tok in tokens:
        needles = [tok.encode(), tok[4:].encode(), token_secret(tok)]
        for path, content in on_disk.items():
            for needle in needles:
                assert needle not in content, (tok, needle, path)


async def test_tokens_are_256_bit_and_distinct(server):
    async with conn(server.url) as c:
        rs = [await c.ok("execute", code=WAIT, attach=False) for _ in range(2)]
        key = "k-" + secrets.token_hex(8)
        rs.append(await c.ok("execute", code=WAIT, attach=False, idempotency_key=key))
        rs.append(await c.ok("execute", code=WAIT, attach=False, idempotency_key=key + "x"))
        seen: set[str] = set()
        for r in rs:
            assert r["token"].startswith("bto_") and r["viewer_token"].startswith("btv_"), r
            owner, viewer = token_secret(r["token"]), token_secret(r["viewer_token"])
            assert len(owner) >= 32 and len(viewer) >= 32, r
            assert owner != viewer
            seen |= {r["token"], r["viewer_token"], r["token"][4:], r["viewer_token"][4:]}
        assert len(seen) == 4 * len(rs), rs
        assert len({r["session"] for r in rs}) == len(rs)
        for r in rs:
            await c.ok("destroy", token=r["token"])


async def test_session_id_and_altered_tokens_grant_nothing(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=WAIT, attach=False)
        sid, owner, viewer = r["session"], r["token"], r["viewer_token"]
        fakes = [sid, "bto_" + sid, "btv_" + viewer[4:-1], "bto_" + viewer[4:],
                 "btv_" + owner[4:], owner[4:], owner.upper(), owner + "A", ""]
        for fake in fakes:
            assert await err(c, "attach", token=fake) == "not_found", fake
        assert await err(c, "status", token=sid) == "not_found"
        assert await err(c, "state_put", token="bto_" + viewer[4:], value=1) == "not_found"
        assert (await c.ok("state_get", token=viewer))["version"] == 0
        await c.ok("destroy", token=owner)


async def test_function_id_cannot_reach_outside_the_store(server):
    """execute by function id only finds stored functions: path-like or
    malformed ids are not_found, and the connection stays open."""
    async with conn(server.url) as c:
        fid = (await c.ok("store", name="f", code="def main():\n    return 'stored'\n"))["function"]
        for bad in ("../secret", "../../../../etc/passwd", "/etc/passwd", fid.upper(),
                    fid + "/", "../functions/" + fid, fid[:-1], "", "\0" * 64):
            r = await c.request("execute", function=bad)
            assert r["ok"] is False and r["error"]["code"] in ("not_found", "bad_request"), (bad, r)
            await still_open(c)
        r = await c.ok("execute", function=fid)
        assert (await c.frames(r["session"]))[-1][2]["result"] == "stored"


async def test_failed_token_guesses_are_rate_limited(make_server):
    """Many attaches with random tokens from one peer eventually get ``limit``;
    the refusal is per request (the connection stays open) and it is a rate:
    the valid token works again after a pause."""
    srv = make_server()
    async with conn(srv.url) as owner:
        r = await owner.ok("execute", code=WAIT, attach=False)
    codes: list[str] = []
    async with conn(srv.url) as g:
        for _ in range(300):
            codes.append(await err(g, "attach", token="bto_" + secrets.token_urlsafe(32)))
            if codes[-1] == "limit":
                break
        assert codes[-1] == "limit", codes
        assert set(codes[:-1]) == {"not_found"}, codes
        await still_open(g)
        # Other token ops are limited as well while the bucket is empty.
        assert await err(g, "status", token="bto_" + secrets.token_urlsafe(32)) == "limit"
        # Observed, not promised by PROTOCOL.md, so not asserted: the limit is a
        # token bucket per peer host (burst 20, then 2 per second); while it is
        # empty even the valid token gets `limit`, on this connection and on any
        # other connection or process from 127.0.0.1.
        with trio.fail_after(15):
            while True:
                a = await g.request("attach", token=r["viewer_token"])
                if a["ok"]:
                    break
                assert a["error"]["code"] == "limit", a
                await trio.sleep(0.25)
        assert a["session"] == r["session"] and a["mode"] == "ro"


async def test_viewer_token_cannot_write(server):
    code = "def main():\n    for i in range(10):\n        api.send(i)\n    return api.recv()\n"
    async with conn(server.url) as owner, conn(server.url) as viewer:
        r = await owner.ok("execute", code=code)
        sid, tok, vtok = r["session"], r["token"], r["viewer_token"]
        of = await owner.frames(sid, until_exit=False, count=10)
        a = await viewer.ok("attach", token=vtok)
        assert a["mode"] == "ro"
        vf = await viewer.frames(sid, until_exit=False, count=10)
        assert vf == of
        # input over the viewer attachment: forbidden (an event), nothing accepted.
        await viewer.send({"op": "input", "session": sid, "seq": 1, "data": "from viewer"})
        ev = await viewer.event(ev="error", timeout=5)
        assert ev["session"] == sid and ev["error"]["code"] == "forbidden", ev
        # Token ops that need the owner: forbidden replies.
        for op, fields in (("signal", {"signal": "KILL"}), ("signal", {"signal": "INT"}),
                           ("destroy", {}), ("state_put", {"value": "v"}),
                           ("state_put", {"value": "v", "if_version": 0})):
            assert await err(viewer, op, token=vtok, **fields) == "forbidden", (op, fields)
        await still_open(viewer)
        # The viewer's ack does not trim.
        await viewer.send({"op": "ack", "session": sid, "seq": 10})
        await still_open(viewer)
        await trio.sleep(0.3)
        st = await owner.ok("status", token=tok)
        assert st["state"] == "running" and st["acked_seq"] == 0 and st["first_seq"] == 1, st
        assert st["input_seq"] == 0, st
        assert (await owner.ok("state_get", token=vtok))["version"] == 0
        # Control: the owner's smaller ack does move acked_seq, to exactly its value
        # (had the viewer's ack of 10 counted, acked_seq would be 10).
        await owner.send({"op": "ack", "session": sid, "seq": 3})
        with trio.fail_after(5):
            while (st := await owner.ok("status", token=tok))["acked_seq"] < 3:
                await trio.sleep(0.02)
        assert st["acked_seq"] == 3, st
        # A viewer re-attaching from 1 is told frames 1..3 are gone, via a gap.
        await viewer.ok("detach", session=sid)
        async with conn(server.url) as late:
            await late.ok("attach", token=vtok)
            lf = await late.frames(sid, until_exit=False, count=8)
            assert lf[0][1] == "gap" and lf[0][2]["from"] == 1 and lf[0][2]["to"] >= 3, lf[0]
        # The function only ever sees the owner's input.
        await owner.send({"op": "input", "session": sid, "seq": 1, "data": "from owner"})
        frames = await owner.frames(sid)
        assert frames[-1][2]["result"] == "from owner"
        assert not viewer.events or all(e.get("ev") != "in_ack" for e in viewer.events)


async def test_viewer_reconnecting_stays_read_only(server):
    """Every attach with the viewer token is read-only; input (even an eof) is
    forbidden on each, and destroy kills both tokens."""
    async with conn(server.url) as owner:
        r = await owner.ok("execute", code=WAIT, attach=False)
        sid = r["session"]
        for _ in range(2):
            async with conn(server.url) as v:
                a = await v.ok("attach", token=r["viewer_token"])
                assert a["mode"] == "ro"
                await v.send({"op": "input", "session": sid, "seq": 1, "eof": True})
                ev = await v.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "forbidden", ev
        st = await owner.ok("status", token=r["token"])
        assert st["input_seq"] == 0 and st["state"] in ("starting", "running"), st
        await owner.ok("destroy", token=r["token"])
        # After destroy both tokens are dead.
        for t in (r["token"], r["viewer_token"]):
            assert await err(owner, "attach", token=t) == "not_found"
