"""End-to-end: the plain HTTP surface on the WebSocket port of a real server
(/healthz, /readyz, /metrics, the page's files, and every refusal), asked with
the standard library's HTTP client and with raw sockets."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl

import trio
from helpers import connect
from prometheus_client.parser import text_string_to_metric_families
from test_security import self_signed

KEY = "k-" + "x" * 30


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    if tls is None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


async def aget(port: int, path: str, **kw) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(lambda: get(port, path, **kw))


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection (a reset
    counts as closing: a server that closes with bytes unread resets)."""
    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except ConnectionResetError:
                pass
            return out
    return await trio.to_thread.run_sync(run)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def figures(text: bytes) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_healthz_and_readyz(server):
    status, headers, body = await aget(server.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close" and headers["x-content-type-options"] == "nosniff"
    status, _, body = await aget(server.port, "/readyz")
    assert (status, body) == (200, b"ready\n")


async def test_the_same_routes_over_tls(make_server, tmp_path):
    cert, key = self_signed(tmp_path)
    srv = make_server("--tls-cert", cert, "--tls-key", key)
    tls = ssl.create_default_context(cafile=cert)
    assert (await aget(srv.port, "/healthz", tls=tls))[:3:2] == (200, b"ok\n")
    status, _, body = await aget(srv.port, "/metrics", tls=tls)
    assert status == 200 and ("bento_connections", ()) in figures(body)
    # Plain HTTP to the TLS port gets no answer, and the server goes on.
    assert await raw(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert (await aget(srv.port, "/healthz", tls=tls))[0] == 200


async def test_readyz_says_why_when_the_data_dir_is_gone(make_server):
    srv = make_server()
    shutil.rmtree(srv.data_dir)
    status, _, body = await aget(srv.port, "/readyz")
    assert status == 503
    assert b"not ready: the data dir" in body and b"cannot be written" in body, body
    assert (await aget(srv.port, "/healthz"))[0] == 200  # the process still answers


async def test_the_page_and_its_files(server):
    status, headers, page = await aget(server.port, "/")
    assert status == 200 and page.lstrip().lower().startswith(b"<!doctype html>")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "connect-src 'self'" in csp, csp
    assert "unsafe-eval" not in csp and "script-src 'self' 'unsafe-inline'" not in csp
    assert f"ws://127.0.0.1:{server.port}" in csp
    status, headers, same = await aget(server.port, "/static/index.html")
    assert status == 200 and same == page
    status, headers, nothing = await aget(server.port, "/", method="HEAD")
    assert status == 200 and nothing == b"" and int(headers["content-length"]) == len(page)


async def test_no_path_leads_outside_the_static_files(server):
    paths = [
        "/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/server.py",
        "/static/%2e%2e%2fserver.py", "/static/../../bento/server.py", "/static/..\\server.py",
        "/static//etc/passwd", "/static/.", "/static/", "/static/.hidden", "/static/%00index.html",
        "/static/index.html/..", "/static/index.html%00.js", "/index.html", "/server.py",
    ]
    for path in paths:
        response = await raw(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status_of(response) == 404, (path, response[:200])
        assert b"def serve" not in response and b"root:" not in response, path


async def test_refusals(server):
    status, headers, body = await aget(server.port, "/nope")
    assert status == 404 and b"/v1" in body and len(body) < 200
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = await aget(server.port, "/", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = await aget(server.port, "/v1")  # no upgrade
    assert status == 426 and b"WebSocket" in body
    status, headers, body = await aget(server.port, "/v1", method="POST")  # as docs/protocol.md says
    assert status == 405 and headers["allow"] == "GET, HEAD"
    # Malformed: 400 and the connection closes (raw() reads until it does).
    response = await raw(server.port, b"GARBAGE\r\n\r\n")
    assert status_of(response) == 400 and b"bad request" in response
    # An oversized head: refused without being read to its end.
    huge = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    response = await raw(server.port, huge)
    assert status_of(response) == 431, response[:100]
    # The server still serves WebSocket clients after all that.
    async with connect(server.url) as c:
        await c.ok("ping")


async def test_metrics_need_the_api_key_when_the_server_has_keys(make_server):
    srv = make_server("--api-key", KEY)
    status, headers, body = await aget(srv.port, "/metrics")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, _, _ = await aget(srv.port, "/metrics", headers={"Authorization": "Bearer not-the-key-7f3a"})
    assert status == 401
    with trio.fail_after(10):  # as docs/operations.md says: refused requests are logged by class
        while "what=bad_key" not in srv.read_log():
            await trio.sleep(0.05)
    assert "path=/metrics" in srv.read_log() and "not-the-key-7f3a" not in srv.read_log()
    status, headers, body = await aget(srv.port, "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert ("bento_connections", ()) in figures(body)


async def test_metrics_move_as_a_session_runs(server):
    status, _, body = await aget(server.port, "/metrics")
    assert status == 200
    before = figures(body)
    code = "def main(n):\n    for i in range(n):\n        print(i, flush=True)\n    return api.recv()\n"
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code, args=[200], attach=True)
        sid = r["session"]
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "done"})
        frames = await c.frames(sid)
        during = figures((await aget(server.port, "/metrics"))[2])
    rw = ("bento_attachments", (("mode", "rw"),))
    with trio.fail_after(10):  # the server sees the connection go a moment later
        while (after := figures((await aget(server.port, "/metrics"))[2]))[rw] != during[rw] - 1:
            await trio.sleep(0.05)

    def moved(name: str, labels: tuple = ()) -> float:
        return during.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("bento_executes_total") == 1
    assert moved("bento_execute_start_seconds_count") == 1
    assert moved("bento_frames_out_total") >= len(frames)
    assert moved("bento_inputs_total") == 1
    assert moved("bento_sent_bytes_total") > 200 * 2
    assert moved("bento_received_bytes_total") > 0
    assert during[("bento_connections", ())] >= 1
    assert during[rw] >= 1
    assert sum(v for (name, _), v in during.items() if name == "bento_sessions") >= 1
    # A wrong token is counted as a failed guess, and its error by code.
    async with connect(server.url) as c:
        r = await c.request("status", token="bto_" + "A" * 43)
        assert r["error"]["code"] == "not_found"
    last = figures((await aget(server.port, "/metrics"))[2])
    assert last[("bento_token_guesses_failed_total", ())] == after.get(("bento_token_guesses_failed_total", ()), 0) + 1
    assert last[("bento_errors_total", (("code", "not_found"),))] >= 1


async def test_the_start_latency_is_observed_for_warm_and_cold_environments(make_server):
    """A warm environment's session runs when the execute is answered (observed
    at once); a cold one starts later (observed when it says so)."""
    code = "def main():\n    return 1\n"
    for pool in ("2", "0"):
        srv = make_server("--pool", pool)
        before = figures((await aget(srv.port, "/metrics"))[2])
        async with connect(srv.url) as c:
            for _ in range(2):
                r = await c.ok("execute", code=code, attach=True)
                await c.frames(r["session"])
        key = ("bento_execute_start_seconds_count", ())
        with trio.fail_after(10):
            while figures((await aget(srv.port, "/metrics"))[2]).get(key, 0) - before.get(key, 0) < 2:
                await trio.sleep(0.05)
        after = figures((await aget(srv.port, "/metrics"))[2])
        assert after[key] - before.get(key, 0) == 2, pool
