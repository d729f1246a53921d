"""Errors a user of the SDK meets first, against real servers: a request over the
server's max_message, a connection that cannot be made (refused, TLS), and a
missing or refused API key. Each says why and what to do, at once."""

from __future__ import annotations

import socket

import bento_clients
import pytest
import trio
from bento_clients.errors import ConnectionLost, TooLarge, Unauthorized
from client_helpers import cli_env, run_cli, write_file
from helpers import self_signed

TEST_TIMEOUT_S = 60
SMALL = 1 << 20  # the servers' max_message here: 1 MiB
ECHO_LEN = "def main(data):\n    return len(data)\n"


async def test_a_request_over_max_message_fails_at_once_with_size_and_limit(make_server):
    """An execute with an argument over the limit the server announced in hello, a
    script over it, and an input over it: each refused before it is sent; the
    connection stays up and serves the next request."""
    srv = make_server("--max-message", str(SMALL))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(srv.url) as c:
            assert c.server_info["max_message"] == SMALL
            with trio.fail_after(2), pytest.raises(TooLarge) as caught:
                await c.execute(ECHO_LEN, b"x" * (2 * SMALL))
            err = caught.value
            assert err.code == "too_large" and err.details["limit"] == SMALL
            assert err.details["size"] > 2 * SMALL
            assert f"{err.details['size']:,} bytes" in str(err) and f"{SMALL:,} bytes" in str(err)
            assert "execute" in str(err) and "not sent" in str(err)
            with trio.fail_after(2), pytest.raises(TooLarge, match="execute message"):
                await c.execute("# padding\n" * (SMALL // 8) + ECHO_LEN, b"")
            s = await c.execute("def main():\n    return api.recv()\n")
            with pytest.raises(TooLarge, match="input message"):
                await s.send("y" * SMALL)
            await s.send("fits")
            assert await s.result() == "fits"
            assert await (await c.execute(ECHO_LEN, b"x" * 1000)).result() == 1000
            assert c.reconnects == 0 and c.connected


async def test_a_1009_close_ends_its_request_instead_of_resending_it(make_server):
    """A server that closes the connection with 1009 for a request (here: the
    client is made to believe a larger bound than the server has): that request
    fails with the reason, once; the client reconnects for everything else."""
    srv = make_server("--max-message", str(SMALL))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(srv.url, backoff_max=0.2) as c:
            c._sup.link.max_message = 64 * SMALL  # what a server that announces too much would cause
            with trio.fail_after(10), pytest.raises(TooLarge) as caught:
                await c.execute(ECHO_LEN, b"x" * (2 * SMALL))
            err = caught.value
            assert f"{err.details['size']:,} bytes" in str(err) and err.details["size"] > 2 * SMALL
            assert "closed by the server (1009" in str(err) and "not sent again" in str(err)
            assert await (await c.execute(ECHO_LEN, b"x" * 1000)).result() == 1000
            assert c.reconnects == 1


async def test_the_cli_fails_at_once_on_a_script_over_max_message(make_server, tmp_path):
    """``bento run`` of a script over the server's max_message: one clear line and
    a failure exit, not a reconnect loop."""
    srv = make_server("--max-message", str(SMALL))
    script = write_file(str(tmp_path), "big.py", "# padding\n" * (SMALL // 8) + "def main():\n    return 1\n")
    env = cli_env(str(tmp_path / "state" / "client.json"), srv.url)
    started = trio.current_time()
    r = await trio.to_thread.run_sync(lambda: run_cli(["run", script], env, timeout=30))
    assert trio.current_time() - started < 15
    assert r.returncode != 0, r
    assert f"over the server's limit of {SMALL:,} bytes" in r.stderr.decode(), r.stderr
    assert b"reconnect" not in r.stderr, r.stderr


# -- connections that cannot be made ---------------------------------------------

FAST_S = 5  # a hopeless connection fails this fast, not after connect_timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def connect_error(url: str, **options) -> str:
    """The ConnectionLost message of connecting to ``url`` (it must fail)."""
    with pytest.raises(ConnectionLost) as caught:
        async with bento_clients.connect(url, **options):
            pass
    return str(caught.value)


async def test_connection_refused_says_to_start_a_server():
    url = f"ws://127.0.0.1:{free_port()}/v1"
    with trio.fail_after(FAST_S):
        message = await connect_error(url, connect_timeout=0.5)
    assert f"connection refused — is a server running at {url}? start one with `make run`" in message


@pytest.fixture
def tls_server(make_server, tmp_path):
    cert, key = self_signed(tmp_path)
    return make_server("--tls-cert", cert, "--tls-key", key), cert


async def test_tls_errors_say_what_to_do(tls_server, server, tmp_path, monkeypatch):
    """An untrusted certificate, ws:// to a TLS server and wss:// to a plain one
    each fail at once with what to do; ca_file (or BENTO_CA_FILE) trusts a
    self-signed certificate, in the async SDK and the blocking one."""
    tls, cert = tls_server
    wss = f"wss://127.0.0.1:{tls.port}/v1"
    monkeypatch.delenv("BENTO_CA_FILE", raising=False)
    with trio.fail_after(FAST_S):
        message = await connect_error(wss, connect_timeout=30)
    assert "TLS: certificate verify failed" in message and "(use --ca-file or BENTO_CA_FILE)" in message
    with trio.fail_after(FAST_S):
        message = await connect_error(f"ws://127.0.0.1:{tls.port}/v1", connect_timeout=30)
    assert "this is a TLS server: use wss://" in message
    with trio.fail_after(FAST_S):
        message = await connect_error(f"wss://127.0.0.1:{server.port}/v1", connect_timeout=30, ca_file=cert)
    assert "this is not a TLS server: use ws://" in message

    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(wss, ca_file=cert) as c:
            assert await (await c.execute(ECHO_LEN, b"tls")).result() == 3
    monkeypatch.setenv("BENTO_CA_FILE", cert)

    def blocking() -> int:
        with bento_clients.sync.connect(wss, call_timeout=30) as c:
            return c.execute(ECHO_LEN, b"sync").result()

    assert await trio.to_thread.run_sync(blocking) == 4
    with pytest.raises(ValueError, match="cannot use the CA file"):
        async with bento_clients.connect(wss, ca_file=str(tmp_path / "missing.pem")):
            pass


# -- API keys ----------------------------------------------------------------------


async def test_unauthorized_says_whether_a_key_was_sent(make_server, monkeypatch):
    monkeypatch.delenv("BENTO_API_KEY", raising=False)
    srv = make_server("--api-key", "right")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(srv.url) as c:
            with pytest.raises(Unauthorized) as caught:
                await c.execute(ECHO_LEN, b"")
            assert caught.value.key_sent is False
            assert "none was sent (give api_key= or set BENTO_API_KEY)" in str(caught.value)
        async with bento_clients.connect(srv.url, api_key="wrong") as c:
            with pytest.raises(Unauthorized) as caught:
                await c.list()
            assert caught.value.key_sent is True and caught.value.op == "list"
            assert "the API key was refused" in str(caught.value)
        async with bento_clients.connect(srv.url, api_key="right") as c:
            assert await (await c.execute(ECHO_LEN, b"ok")).result() == 2


def test_unavailable_is_its_own_error_and_the_cli_says_it_in_words():
    from bento_clients.cli import describe_error
    from bento_clients.errors import RequestFailed, Unavailable

    err = RequestFailed.from_reply({"code": "unavailable", "message": "this node cannot reach the cluster's "
                                    "Redis (refused): try again, or ask another node"}, "status")
    assert isinstance(err, Unavailable) and err.code == "unavailable"
    line = describe_error(err, key_sent=False)
    assert line.startswith("the cluster is unavailable from this node: ") and "ask another node" in line


def test_a_replaced_viewer_token_is_said_in_words_not_as_no_such_session():
    from bento_clients.cli import describe_error
    from bento_clients.errors import NotFound, RequestFailed

    said = ("this viewer token was replaced or revoked by the session's owner (share): "
            "ask them for the current link")
    err = RequestFailed.from_reply({"code": "not_found", "message": said, "replaced": True}, "attach")
    assert isinstance(err, NotFound) and describe_error(err, key_sent=False) == said
    plain = RequestFailed.from_reply({"code": "not_found", "message": "no session has this token"}, "attach")
    assert describe_error(plain, key_sent=False).startswith("no session has this token (a wrong token")
