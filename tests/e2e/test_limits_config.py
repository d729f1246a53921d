"""Server-side limit defaults and maxima, and the command-prefix backend."""

from __future__ import annotations

from helpers import connect

READ_ENV = "import os\ndef main():\n    return os.environ.get('BENTO_PREFIX_SAW')\n"


async def test_defaults_and_maxima(make_server):
    srv = make_server("--sandbox", "none", "--default-limit", "wall_s=30",
                      "--max-limit", "wall_s=60", "--max-limit", "output_bytes=1000000")
    async with connect(srv.url) as c:
        r = await c.ok("execute", code="def main():\n    return 1\n", attach=False)
        st = await c.ok("status", token=r["token"])
        # the default applies; a limit with a maximum is always in force
        assert "wall_s" in st["enforced"] and "output_bytes" in st["enforced"], st
        bad = await c.request("execute", code="def main():\n    return 1\n", limits={"wall_s": 61})
        assert bad["error"]["code"] == "bad_request" and "60" in bad["error"]["message"]
        ok = await c.ok("execute", code="def main():\n    return 2\n", limits={"wall_s": 60})
        assert (await c.frames(ok["session"]))[-1][2]["result"] == 2


async def test_bad_limit_options_are_refused(make_server, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir",
                        str(tmp_path / "d"), "--max-limit", "walls=3"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "walls=3" in r.stderr


async def test_sandbox_cmd_prefix_runs_the_driver(make_server):
    srv = make_server("--sandbox-cmd", "env BENTO_PREFIX_SAW=yes")
    async with connect(srv.url) as c:
        r = await c.ok("execute", code=READ_ENV)
        ex = (await c.frames(r["session"]))[-1][2]
        st = await c.ok("status", token=r["token"])
    assert ex["result"] == "yes", ex
    assert st["sandbox"] == "cmd"


def test_negative_keep_and_history_options_are_refused(tmp_path):
    import subprocess
    import sys

    for option in ("--keep", "--ttl", "--history-bytes", "--max-history-bytes"):
        r = subprocess.run([sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir",
                            str(tmp_path / "d"), option, "-1"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and f"argument {option}: invalid" in r.stderr, (option, r.stderr)
