"""End-to-end: an execute's packages, installed from the package index once per spec.

Needs the package index (uv installs ``six`` and ``idna``, two small pure-Python
packages without dependencies). The sandbox must never show the server's own
packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio
from helpers import conn, data_of

from bento import envs

IMPORTS = '''
def main(names):
    import importlib, sys
    found = {}
    for name in names:
        try:
            importlib.import_module(name)
            found[name] = True
        except ImportError:
            found[name] = False
    return {"found": found, "path": sys.path}
'''

BENTO = [sys.executable, "-m", "bento.app"]


async def run(url: str, **fields) -> list[list]:
    async with conn(url) as c:
        r = await c.ok("execute", code=IMPORTS, **fields)
        return await c.frames(r["session"], timeout=120)


@pytest.mark.deadline(300)
async def test_the_sandbox_shows_only_the_driver_of_the_servers_packages(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=IMPORTS, args=[["trio", "cbor2", "pytest", "bento", "bento_driver"]])
        frames = await c.frames(r["session"])
        status = await c.ok("status", token=r["token"])
    if status["sandbox"] != "bwrap":
        pytest.skip("only bwrap hides the host's packages")
    result = frames[-1][2]["result"]
    assert result["found"] == {"trio": False, "cbor2": False, "pytest": False, "bento": False,
                               "bento_driver": True}, result
    assert not any(".venv" in p or "site-packages" in p for p in result["path"]), result["path"]


@pytest.mark.deadline(300)
async def test_packages_importable_built_once_for_two_concurrent_executes(server):
    results: list[list[list]] = []

    async def one() -> None:
        results.append(await run(server.url, args=[["six"]], packages=["six"]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    for frames in results:
        assert frames[-1][2]["state"] == "exited", frames[-1]
        assert frames[-1][2]["result"]["found"] == {"six": True}
    builds = [data_of(frames, "stderr") for frames in results]
    assert sum(b.count(b"bento: installing six with uv") for b in builds) == 1, builds
    # The spec is normalised: another spelling is the same environment (no build).
    again = await run(server.url, args=[["six"]], packages=["SIX"])
    assert again[-1][2]["result"]["found"] == {"six": True}
    assert b"installing" not in data_of(again, "stderr")
    # Without it, it is not there.
    plain = await run(server.url, args=[["six"]])
    assert plain[-1][2]["result"]["found"] == {"six": False}
    listed = json.loads(subprocess.run(BENTO + ["env", "--data-dir", server.data_dir, "ls", "--json"],
                                       capture_output=True, check=True).stdout)
    assert [e["specs"] for e in listed] == [["six"]]


WAITS = "def main():\n    import six\n    print(six.__name__, flush=True)\n    return api.recv()\n"


@pytest.mark.deadline(300)
async def test_a_function_on_a_ready_environment_holds_it_until_it_ends(server):
    """A function on a ready environment (the server's pool makes it a warm
    one, whose start goes out before its exchange sets itself up) keeps the
    environment locked (never evicted) while it runs; it is let go at the end."""
    envs_dir = os.path.join(server.data_dir, "envs")
    built = await run(server.url, args=[["six"]], packages=["six"])
    assert built[-1][2]["result"]["found"] == {"six": True}
    async with conn(server.url) as c:
        r = await c.ok("execute", code=WAITS, packages=["six"])
        first = await c.frames(r["session"], until_exit=False, count=1)
        assert first[0][1:] == ["stdout", b"six\n"], first
        assert [e["in_use"] for e in envs.listing(envs_dir)] == [True]
        await c.send({"op": "input", "session": r["session"], "seq": 1, "data": 7})
        end = await c.frames(r["session"])
        assert end[-1][2]["state"] == "exited" and end[-1][2]["result"] == 7, end[-1]
    for _ in range(100):
        if [e["in_use"] for e in envs.listing(envs_dir)] == [False]:
            break
        await trio.sleep(0.05)
    assert [e["in_use"] for e in envs.listing(envs_dir)] == [False]


@pytest.mark.deadline(300)
async def test_a_failed_build_ends_the_session_failed_with_the_installers_message(server):
    frames = await run(server.url, packages=["bento-no-such-package-at-all-20261204"])
    ex = frames[-1][2]
    assert ex["state"] == "failed" and ex["error"]["type"] == "BuildError", ex
    assert "bento-no-such-package-at-all-20261204" in ex["error"]["message"]
    assert b"bento: installing" in data_of(frames, "stderr")


@pytest.mark.parametrize("spec", [
    "--index-url=http://evil.example/simple", "-r/etc/passwd", "/etc/passwd", "./local",
    "six @ file:///etc/passwd", "six; python_version>'3'", "six\nidna", "", "x" * 201,
])
async def test_specs_that_are_not_plain_requirements_are_refused(server, spec):
    async with conn(server.url) as c:
        r = await c.request("execute", code=IMPORTS, packages=[spec])
    assert not r["ok"] and r["error"]["code"] == "bad_request", r
    assert "packages" in r["error"]["message"]


@pytest.mark.deadline(300)
async def test_least_recently_used_environment_goes_over_the_cap(make_server):
    # six (~95 KiB with its bytecode) or idna (~515 KiB), not both
    srv = make_server("--max-env-bytes", str(560 * 1024))
    first = await run(srv.url, args=[["six"]], packages=["six"])
    assert first[-1][2]["result"]["found"] == {"six": True}
    second = await run(srv.url, args=[["idna"]], packages=["idna"])
    assert second[-1][2]["result"]["found"] == {"idna": True}
    assert b"removed the least recently used environment" in data_of(second, "stderr")
    envs_dir = os.path.join(srv.data_dir, "envs")
    listed = json.loads(subprocess.run(BENTO + ["env", "--data-dir", srv.data_dir, "ls", "--json"],
                                       capture_output=True, check=True).stdout)
    assert [e["specs"] for e in listed] == [["idna"]]
    # As docs/operations.md writes it: the data dir after the command.
    after = subprocess.run(BENTO + ["env", "ls", "--data-dir", srv.data_dir, "--json"], capture_output=True)
    assert after.returncode == 0 and json.loads(after.stdout) == listed, after.stderr
    rm = subprocess.run(BENTO + ["env", "rm", listed[0]["name"], "--data-dir", srv.data_dir],
                        capture_output=True)
    assert rm.returncode == 0, rm.stderr
    assert not os.path.exists(os.path.join(envs_dir, listed[0]["name"]))
    bad = subprocess.run(BENTO + ["env", "--data-dir", srv.data_dir, "rm", "../x"], capture_output=True)
    assert bad.returncode == 1 and b"not an environment name" in bad.stderr


@pytest.mark.deadline(300)
def test_cli_pip_and_requirements(server, tmp_path):
    job = tmp_path / "job.py"
    job.write_text("import six, idna\ndef main():\n    return [six.__name__, idna.__name__]\n")
    req = tmp_path / "req.txt"
    req.write_text("# what the job needs\nidna  # for hostnames\n\n")
    env = {**os.environ, "BENTO_SERVER": server.url, "BENTO_CLIENT_STATE": str(tmp_path / "state.json")}
    r = subprocess.run(BENTO + ["run", str(job), "--pip", "six", "-r", str(req), "--no-stdin"],
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["six", "idna"]
    assert b"bento: installing idna, six with uv" in r.stderr
    req.write_text("--index-url http://evil.example/simple\nsix\n")
    r = subprocess.run(BENTO + ["run", str(job), "-r", str(req)], capture_output=True, env=env, timeout=60)
    assert r.returncode == 2 and b"options are not supported" in r.stderr


@pytest.mark.deadline(300)
async def test_sdk_execute_with_packages(server):
    import bento_clients

    async with bento_clients.connect(server.url) as c:
        s = await c.execute(IMPORTS, ["six"], packages=["six"])
        assert (await s.result())["found"] == {"six": True}
        with pytest.raises(TypeError, match="list of requirements"):
            await c.execute(IMPORTS, packages="six")


@pytest.mark.deadline(300)
async def test_environments_quota_counts_the_builds_of_a_key_that_still_exist(make_server, tmp_path):
    config = tmp_path / "bento.toml"
    config.write_text('quota_environments = 1\npool = 0\n[keys.alice]\nkey = "k-alice"\n'
                      '[keys.bob]\nkey = "k-bob"\nquota = {environments = 0}\n')
    srv = make_server("--config", str(config))
    async with conn(srv.url, auth="k-bob") as bob, conn(srv.url, auth="k-alice") as alice:
        # Bob may build none: new packages are refused before anything is installed.
        r = await bob.request("execute", code=IMPORTS, args=[["six"]], packages=["six"])
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "environments"), r
        assert "quota is 0" in r["error"]["message"]
        # Alice builds one: her quota.
        r = await alice.ok("execute", code=IMPORTS, args=[["six"]], packages=["six"])
        frames = await alice.frames(r["session"], timeout=120)
        assert frames[-1][2]["result"]["found"] == {"six": True}, frames[-1]
        assert b"installing six" in data_of(frames, "stderr")
        r = await alice.request("execute", code=IMPORTS, args=[["idna"]], packages=["idna"])
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "environments"), r
        assert "holds 1 environments" in r["error"]["message"]
        # A ready environment is no build, for her and for bob.
        for c, spelling in ((alice, "SIX"), (bob, "six")):
            r = await c.ok("execute", code=IMPORTS, args=[["six"]], packages=[spelling])
            frames = await c.frames(r["session"], timeout=60)
            assert frames[-1][2]["result"]["found"] == {"six": True}, frames[-1]
            assert b"installing" not in data_of(frames, "stderr")
        # Removed, it no longer counts: she may build another.
        listed = json.loads(subprocess.run(BENTO + ["env", "--data-dir", srv.data_dir, "ls", "--json"],
                                           capture_output=True, check=True).stdout)
        subprocess.run(BENTO + ["env", "--data-dir", srv.data_dir, "rm", listed[0]["name"]], check=True,
                       capture_output=True)
        r = await alice.ok("execute", code=IMPORTS, args=[["idna"]], packages=["idna"])
        frames = await alice.frames(r["session"], timeout=120)
        assert frames[-1][2]["result"]["found"] == {"idna": True}, frames[-1]
