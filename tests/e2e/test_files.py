"""End-to-end: a project's files in, the function's files out, and hostile paths refused.

The work dir is the sandbox's home (a bind of ``sessions/<id>/work``): what the
function writes there is readable during the run and after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import conn

PROJECT = {
    "pkg/__init__.py": b"",
    "pkg/helper.py": b"def double(x):\n    return 2 * x\n",
    "pkg/job.py": b"""
import os
from .helper import double

def main(n):
    here = os.path.dirname(__file__)
    with open("data/input.csv") as f:
        rows = [int(line) for line in f.read().split()]
    out = bytes(range(256)) * n + ",".join(str(double(r)) for r in rows).encode()
    with open("out/result.bin", "wb") as f:
        f.write(out)
    api.send("written")
    upload = api.recv()  # the client uploads a file, then says where
    with open(upload, "rb") as f:
        got = f.read()
    return {"file": os.path.relpath(__file__, os.getcwd()), "here": os.path.basename(here),
            "cwd_is_home": os.getcwd() == os.path.expanduser("~"), "uploaded": got}
""",
    "data/input.csv": b"1\n2\n3\n",
    "out/.keep": b"",
}


async def download(c, token: str, path: str, chunk: int = 1000) -> bytes:
    got = b""
    while True:
        r = await c.ok("file_get", token=token, path=path, offset=len(got), length=chunk)
        got += r["data"]
        if len(got) >= r["size"] or not r["data"]:
            return got


async def test_a_project_runs_and_its_output_file_is_downloaded_byte_exact(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", module="pkg.job", files=PROJECT, args=[40])
        sid, token, viewer = r["session"], r["token"], r["viewer_token"]
        ev = await c.event(ev="out", session=sid)
        assert [f[2] for f in ev["frames"] if f[1] == "msg"] == ["written"], ev
        # During the run: read its output, upload a file.
        expected = bytes(range(256)) * 40 + b"2,4,6"
        assert await download(c, token, "out/result.bin") == expected
        blob = os.urandom(3000)
        await c.ok("file_put", token=token, path="in/upload.bin", data=blob[:1000])
        r2 = await c.ok("file_put", token=token, path="in/upload.bin", data=blob[1000:], offset=1000)
        assert r2["size"] == 3000
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "in/upload.bin"})
        frames = await c.frames(sid)
        ex = frames[-1][2]
        assert ex["state"] == "exited", ex
        assert ex["result"] == {"file": "pkg/job.py", "here": "pkg", "cwd_is_home": True, "uploaded": blob}
        # After the exit, with the viewer token too, in 1000-byte pieces.
        assert await download(c, viewer, "out/result.bin") == expected
        # Viewers read only; nothing goes into an ended session.
        r = await c.request("file_put", token=viewer, path="x", data=b"x")
        assert r["error"]["code"] == "forbidden"
        r = await c.request("file_put", token=token, path="x", data=b"x")
        assert r["error"]["code"] == "gone"
        r = await c.request("file_get", token=token, path="out/missing.bin")
        assert r["error"]["code"] == "not_found"


@pytest.mark.parametrize(("path", "why"), [
    ("../escape.py", "'..'"), ("/etc/passwd", "absolute"), ("a/../../x", "'..'"), ("", "1 to"),
    ("a\\b", "backslash"), (".", "work dir itself"), ("a/" * 40 + "x", "deeper"),
])
async def test_traversal_in_an_execute_is_refused(server, path, why):
    async with conn(server.url) as c:
        r = await c.request("execute", code="def main():\n    pass\n", files={path: b"x"})
        assert not r["ok"] and r["error"]["code"] == "bad_request", r
        assert why in r["error"]["message"], r
        r = await c.request("execute", code="def main():\n    pass\n", files={"a": b"x", "a/b": b"y"})
        assert "both a file and a directory" in r["error"]["message"]


async def test_files_over_the_cap_and_too_many_are_refused(server):
    async with conn(server.url) as c:
        many = {f"f{i}": b"" for i in range(10_001)}
        r = await c.request("execute", code="def main():\n    pass\n", files=many)
        assert r["error"]["code"] == "bad_request" and "more than 10000" in r["error"]["message"], r


SNARE = '''
import os
def main():
    os.symlink("/etc/passwd", "passwd-link")
    os.symlink("/etc", "etc-link")
    os.mkfifo("fifo")
    with open("plain.txt", "w") as f:
        f.write("ok")
    return "set"
'''


async def test_symlinks_and_fifos_the_function_makes_are_not_followed(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=SNARE)
        token = r["token"]
        frames = await c.frames(r["session"])
        assert frames[-1][2]["result"] == "set", frames[-1]
        for path, why in (("passwd-link", "symlink"), ("etc-link/passwd", "symlinks are not followed"),
                          ("fifo", "not a regular file"), ("../meta.cbor", "'..'")):
            r = await c.request("file_get", token=token, path=path)
            assert not r["ok"] and why in r["error"]["message"], (path, r)
        assert await download(c, token, "plain.txt") == b"ok"


CLI = [sys.executable, "-m", "bento.app"]


def _cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, env=env, timeout=60, **kw)


def test_cli_project_dir_file_args_and_cp(server, tmp_path):
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "helper.py").write_text("def total(xs):\n    return sum(xs)\n")
    (project / "pkg" / "job.py").write_text(
        "import os\nfrom .helper import total\n"
        "def run(xs, scale):\n"
        "    data = open('data.csv').read().split()\n"
        "    os.makedirs('out', exist_ok=True)\n"
        "    open('out/report.bin', 'wb').write(bytes(range(256)) * 100)\n"
        "    return [total(xs) * scale, data, os.path.basename(__file__)]\n")
    (project / "big.log").write_bytes(b"x" * 1000)
    (project / ".gitignore").write_text("*.log\n")
    (project / "pkg" / "__pycache__").mkdir()
    (project / "pkg" / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    data = tmp_path / "data.csv"
    data.write_text("a b c\n")
    arg = tmp_path / "xs.json"
    arg.write_text(json.dumps(list(range(50_000))))  # ~300 KB: no command line would take it
    env = {**os.environ, "BENTO_SERVER": server.url, "BENTO_CLIENT_STATE": str(tmp_path / "state.json")}
    r = _cli(["run", str(project), "-m", "pkg.job:run", f"@{arg}", "2", "--file", f"{data}:data.csv",
              "--no-stdin", "-d", "--json"], env)
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["token"]
    logs = _cli(["logs", "-f", token], env)
    assert json.loads(logs.stdout) == [sum(range(50_000)) * 2, ["a", "b", "c"], "job.py"], logs
    out = tmp_path / "report.bin"
    r = _cli(["cp", f"{token}:out/report.bin", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == bytes(range(256)) * 100
    # What .gitignore and the caches name was not sent.
    r = _cli(["cp", f"{token}:big.log", str(tmp_path / "x")], env)
    assert r.returncode == 1 and b"no file 'big.log'" in r.stderr
    r = _cli(["cp", f"{token}:pkg/__pycache__/junk.pyc", str(tmp_path / "x")], env)
    assert r.returncode == 1
    r = _cli(["run", str(tmp_path / "nodir"), "-m", "pkg.job"], env)
    assert r.returncode == 2 and b"no such directory" in r.stderr, r.stderr
    # A symlink out of the tree is refused before anything is sent.
    (project / "leak").symlink_to("/etc/passwd")
    r = _cli(["run", str(project), "-m", "pkg.job:run", "[1]", "1"], env)
    assert r.returncode == 2 and b"symlink out of the tree" in r.stderr


def test_cli_cp_uploads_into_a_running_session(server, tmp_path):
    job = tmp_path / "wait.py"
    job.write_text("def main():\n    name = api.recv()\n    return open(name, 'rb').read().hex()\n")
    env = {**os.environ, "BENTO_SERVER": server.url, "BENTO_CLIENT_STATE": str(tmp_path / "state.json")}
    token = json.loads(_cli(["run", str(job), "-d", "--json", "--name", "box"], env).stdout)["token"]
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(2_500_000))  # three pieces
    r = _cli(["cp", str(blob), f"{token}:in/blob.bin"], env)
    assert r.returncode == 0, r.stderr
    # The session's name stands for its token here too, both ways.
    r = _cli(["cp", "box:in/blob.bin", str(tmp_path / "back.bin")], env)
    assert r.returncode == 0 and (tmp_path / "back.bin").read_bytes() == blob.read_bytes(), r.stderr
    r = _cli(["cp", str(blob), "nobox:in/x.bin"], env)  # no session has that name: both sides are local
    assert r.returncode == 2 and b"SESSION:path" in r.stderr, r.stderr
    assert _cli(["send", token, '"in/blob.bin"'], env).returncode == 0
    logs = _cli(["logs", "-f", token], env)
    assert json.loads(logs.stdout) == blob.read_bytes().hex()
    r = _cli(["cp", str(blob), f"{token}:../escape"], env)
    assert r.returncode == 1 and b"'..'" in r.stderr


async def test_sdk_files_module_download_upload(server):
    import bento_clients
    from bento_clients.tree import pack

    async with bento_clients.connect(server.url) as c:
        s = await c.execute(None, 3, module="pkg.job", files=PROJECT)
        async for frame in s.output():
            assert not isinstance(frame, bento_clients.Exit), frame
            if isinstance(frame, bento_clients.Msg):
                break
        assert await s.download("out/result.bin") == bytes(range(256)) * 3 + b"2,4,6"
        await s.upload("up.txt", b"from the sdk")
        await s.send("up.txt")
        assert (await s.result())["uploaded"] == b"from the sdk"
        assert await s.download("up.txt") == b"from the sdk"
        with pytest.raises(TypeError, match="not both"):
            await c.execute("def main(): pass", module="m")
    with pytest.raises(ValueError, match="not a directory"):
        pack(__file__)


async def test_a_function_that_fills_its_work_dir_is_killed(make_server):
    srv = make_server("--max-work-bytes", str(4 * 1024 * 1024))
    code = ("import os, time\ndef main():\n    for i in range(1000):\n"
            "        with open(f'fill{i}', 'wb') as f:\n            f.write(os.urandom(1 << 20))\n"
            "        time.sleep(0.01)\n")
    async with conn(srv.url) as c:
        r = await c.ok("execute", code=code)
        frames = await c.frames(r["session"], timeout=60)
    ex = frames[-1][2]
    assert ex["state"] == "killed" and ex["error"] == {"type": "LimitExceeded", "message": "work_bytes"}, ex
    work = os.path.join(srv.data_dir, "sessions", r["session"], "work")
    assert len(os.listdir(work)) < 400  # stopped within about a second of passing 4 MiB


async def test_unsandboxed_warm_sessions_work_in_their_work_dir(make_server):
    srv = make_server("--sandbox", "none", "--pool-max", "2")
    code = "import os\ndef main():\n    open('made.txt', 'w').write('here')\n    return os.getcwd()\n"
    async with conn(srv.url) as c:
        for _ in range(3):  # warm environments, each taken by a session
            r = await c.ok("execute", code=code)
            frames = await c.frames(r["session"])
            assert frames[-1][2]["result"] == os.path.join(srv.data_dir, "sessions", r["session"], "work")
            assert await download(c, r["token"], "made.txt") == b"here"
    # Each taken environment's directory became a work dir: only the pool's own are left.
    assert len(os.listdir(os.path.join(srv.data_dir, "warm"))) <= 2
