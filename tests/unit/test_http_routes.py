"""The plain HTTP routes (bento/http.py) on parsed requests, no sockets: which
files the page may serve, content types, and the API-key guard of /metrics."""

from __future__ import annotations

import os

import h11

from bento import auth, http


def request(target: str, method: str = "GET", **headers: str) -> h11.Request:
    return h11.Request(method=method, target=target,
                       headers=[("host", "127.0.0.1:8765"), *headers.items()])


async def never_ready() -> str | None:
    return "the disk is on fire"


def routes(static_dir: str, keys: list[str] | None = None) -> http.Routes:
    return http.Routes(keys=auth.ApiKeys([auth.Key.plain(k) for k in keys or []]), guesses=auth.GuessLimiter(burst=2, per_second=0.01),
                       metrics=lambda: b"bento_up 1\n", ready=never_ready, static_dir=static_dir)


def test_only_plain_files_directly_in_the_directory_are_listed(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.js").write_text("x")
    os.symlink("/etc/passwd", tmp_path / "passwd")
    assert sorted(http.static_files(str(tmp_path))) == ["app.js", "index.html"]
    assert http.static_files(str(tmp_path / "missing")) == {}


async def test_files_get_their_type_and_safety_headers(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / "blob.bin").write_bytes(b"\0")
    r = routes(str(tmp_path))
    page = await r.answer(request("/"), "p")
    assert (page.status, page.body, page.content_type) == (200, b"<!doctype html>", "text/html; charset=utf-8")
    headers = dict(page.headers)
    assert headers["cache-control"] == "no-cache"
    assert headers["content-security-policy"].endswith("ws://127.0.0.1:8765 wss://127.0.0.1:8765")
    assert (await r.answer(request("/static/app.js"), "p")).content_type == "text/javascript; charset=utf-8"
    assert (await r.answer(request("/static/blob.bin"), "p")).content_type == "application/octet-stream"
    for target in ("/static/sub/inner.js", "/static/../http.py", "/static/%2e%2e%2fhttp.py", "/static/"):
        assert (await r.answer(request(target), "p")).status == 404, target


async def test_a_host_header_that_is_not_a_plain_name_stays_out_of_the_policy(tmp_path):
    (tmp_path / "index.html").write_text("x")
    r = routes(str(tmp_path))
    odd = h11.Request(method="GET", target="/", headers=[("host", "a b;script-src *")])
    assert dict((await r.answer(odd, "p")).headers)["content-security-policy"] == http.CSP


async def test_readyz_and_methods(tmp_path):
    r = routes(str(tmp_path))
    ready = await r.answer(request("/readyz"), "p")
    assert (ready.status, ready.body) == (503, b"not ready: the disk is on fire\n")
    refused = await r.answer(request("/healthz", method="DELETE"), "p")
    assert refused.status == 405 and ("allow", "GET, HEAD") in refused.headers


async def test_metrics_guard_spends_the_peers_guesses(tmp_path):
    r = routes(str(tmp_path), keys=["sekrit"])
    assert (await r.answer(request("/metrics"), "p")).status == 401  # no key: costs nothing
    ok = await r.answer(request("/metrics", authorization="Bearer sekrit"), "p")
    assert (ok.status, ok.body) == (200, b"bento_up 1\n")
    statuses = [(await r.answer(request("/metrics", authorization="Bearer nope"), "p")).status
                for _ in range(3)]
    assert statuses == [401, 401, 429]  # a burst of 2 wrong keys, then refused
    assert (await r.answer(request("/metrics", authorization="Bearer sekrit"), "q")).status == 200
