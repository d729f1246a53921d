"""End-to-end: a project's files in, the function's files out, and hostile paths refused.

The work dir is the sandbox's home (a bind of ``sessions/<id>/work``): what the
function writes there is readable during the run and after it.
"""

from __future__ import annotations

import os

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
