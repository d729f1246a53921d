"""The blocking facade (bento_clients.sync) from plain code and threads, and a reattach
from another process that knows only the token string."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import bento_clients
import pytest
from bento_clients.frames import Exit, Stdout
from client_helpers import ROOT, cli_env, line_numbers, run_cli, write_file

ECHO = """
def main(n):
    for i in range(n):
        print("line", i)
    got = []
    while True:
        try:
            got.append(api.recv())
        except EOFError:
            return got
"""


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bento-sync-client"]


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads alive now that were not before. (Not a count: an idle worker thread of
    an earlier test, trio's or another, may end meanwhile.)"""
    return [t for t in threading.enumerate() if t not in before]


def test_blocking_facade_from_plain_code(server):
    before = set(threading.enumerate())
    with bento_clients.sync.connect(server.url, call_timeout=30) as c:
        s = c.execute(ECHO, 3)
        assert s.send("a") == 1 and s.send({"b": 2}) == 2
        s.close_input()
        frames = list(s.output(timeout=20))
        assert s.result(timeout=20) == ["a", {"b": 2}]
        st = c.status(s.token)
        assert st["session"] == s.id
        assert c.state_put(s.token, 5) == 1 and c.state_get(s.viewer_token) == (1, 5)
    assert isinstance(frames[-1], Exit)
    assert b"".join(f.data for f in frames if isinstance(f, Stdout)) == b"line 0\nline 1\nline 2\n"
    assert not _client_threads()
    assert not _new_threads(before), _new_threads(before)
    with pytest.raises(bento_clients.ConnectionLost):
        c.status(s.token)


def test_blocking_facade_has_the_async_sdks_names(server):
    """docs/sdk.md: the same names as the async SDK (files, share, acks)."""
    with bento_clients.sync.connect(server.url, call_timeout=30) as c:
        assert c.connected and c.server_info["max_message"] > 0 and c.on_queued is None
        s = c.execute("import time\ndef main():\n    time.sleep(30)\n")
        c.upload(s.token, "in.txt", b"hello")
        assert c.download(s.viewer_token, "in.txt") == b"hello"
        viewer = c.share(s.token, "rotate")
        assert viewer and viewer != s.viewer_token
        c.destroy(s.token)
        t = c.execute("def main():\n    print('a')\n    print('b')\n", attach=False)
        look = c.attach(t.token, auto_ack=False)
        assert look.auto_ack is False
        frames = list(look.output(timeout=20))
        assert look.queued == 0
        look.ack(frames[-1].seq)
        deadline = time.monotonic() + 10  # (an ack has no reply: status shows it a moment later)
        while c.status(t.token)["acked_seq"] != frames[-1].seq:
            assert time.monotonic() < deadline, c.status(t.token)
            time.sleep(0.02)


def test_blocking_facade_inside_threads_shared_and_not(server):
    before = set(threading.enumerate())
    results: dict[str, object] = {}
    errors: list[BaseException] = []
    shared = bento_clients.sync.connect(server.url, call_timeout=30)

    def own_client(name: str) -> None:
        try:
            c = bento_clients.sync.connect(server.url, call_timeout=30)
            try:
                results[name] = c.execute("def main(x):\n    return x * 2\n", name).result(timeout=20)
            finally:
                c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def shared_client(i: int) -> None:
        try:
            results[f"shared{i}"] = shared.execute("def main(x):\n    return x + 1\n", i).result(timeout=20)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=own_client, args=(n,)) for n in ("a", "b")]
    threads += [threading.Thread(target=shared_client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    shared.close()
    assert not errors, errors
    assert results == {"a": "aa", "b": "bb", "shared0": 1, "shared1": 2, "shared2": 3, "shared3": 4}
    assert not _client_threads()
    assert not _new_threads(before), _new_threads(before)


def test_blocking_errors_are_the_sdk_errors(server):
    with bento_clients.sync.connect(server.url, call_timeout=30) as c:
        with pytest.raises(bento_clients.RemoteError) as info:
            c.execute("def main():\n    raise ValueError('x')\n").result(timeout=20)
        assert info.value.type == "ValueError"
        with pytest.raises(bento_clients.NotFound):
            c.attach("bto_nothing")
        s = c.execute("import time\ndef main():\n    time.sleep(30)\n")
        with pytest.raises(TimeoutError):
            s.result(timeout=0.3)
        s.destroy()
    with pytest.raises(bento_clients.ConnectionLost):
        bento_clients.sync.connect("ws://127.0.0.1:9/v1", connect_timeout=0.3)
    assert not _client_threads()


REATTACH = """
import json, sys
import bento_clients
with bento_clients.sync.connect(sys.argv[1], call_timeout=30) as c:
    s = c.attach(sys.argv[2])
    s.send("from B")
    s.close_input()
    out = b"".join(f.data for f in s.output(timeout=30) if isinstance(f, bento_clients.Stdout))
    print(json.dumps({"out": out.decode(), "result": s.result(timeout=30), "mode": s.mode}))
"""


def test_reattach_from_another_process_with_only_the_token(server, tmp_path):
    """Process A (the CLI, -d) starts the function and exits; process B (the sync
    SDK, its own interpreter) attaches with the token string alone."""
    job = write_file(str(tmp_path), "job.py", ECHO)
    env = cli_env(str(tmp_path / "a-state.json"), server.url)
    a = run_cli(["run", job, "4", "-d", "--json"], env)
    assert a.returncode == 0, a.stderr
    token = json.loads(a.stdout)["token"]
    b = subprocess.run([sys.executable, "-c", REATTACH, server.url, token], capture_output=True,
                       timeout=60, cwd=ROOT, env=cli_env(str(tmp_path / "b-state.json")))
    assert b.returncode == 0, b.stderr
    got = json.loads(b.stdout)
    assert got == {"out": "line 0\nline 1\nline 2\nline 3\n", "result": ["from B"], "mode": "rw"}


def test_blocking_facade_pauses_a_session_it_does_not_read(server):
    code = "def main():\n    for i in range(400):\n        print(f'{i:>8}' + 'z' * 16000, flush=True)\n"
    with bento_clients.sync.connect(server.url, call_timeout=30, max_queued_bytes=256 * 1024) as c:
        s = c.execute(code)
        time.sleep(1.0)  # not read meanwhile: 6 MB arrive, the session pauses at 256 KiB
        assert s.statistics()["queued_bytes"] <= 256 * 1024 + (2 << 20)
        frames = list(s.output(timeout=20))
        stats = s.statistics()
        assert not s.paused
    assert stats["pauses"] >= 1 and stats["duplicates"] == 0, stats
    assert line_numbers(frames) == list(range(400))
