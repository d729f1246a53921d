"""The server's operator settings: size suffixes in every size option, API keys
from a file (never on the command line), a TOML config file whose flags win, and
one clear line (exit 2) for every setting that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT, conn, self_signed

RETURN_ONE = "def main():\n    return 1\n"


def refused(*args: str, timeout: float = 30) -> str:
    """`bento server ARGS` that must refuse to start: exit 2, one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "bento.app", "server", "--port", "0", *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "listening" not in r.stdout and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def write(path, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return str(path)


# -- sizes -----------------------------------------------------------------------------


async def test_every_size_option_takes_suffixes(make_server):
    srv = make_server("--sandbox", "none", "--max-limit", "memory_bytes=512MiB", "--max-message", "2MiB",
                      "--buffer-bytes", "1M", "--max-buffer-bytes", "4MiB", "--default-limit", "output_bytes=1G",
                      "--ttl", "1h", "--idle-timeout", "5m")
    async with conn(srv.url) as c:
        r = await c.request("execute", code=RETURN_ONE, limits={"memory_bytes": 1 << 30})
        assert r["error"]["code"] == "bad_request" and str(512 << 20) in r["error"]["message"], r
        r = await c.request("execute", code=RETURN_ONE, buffer={"max_bytes": 5 << 20})
        assert r["error"]["code"] == "bad_request" and str(4 << 20) in r["error"]["message"], r
        r = await c.ok("execute", code=RETURN_ONE)
        assert (await c.frames(r["session"]))[-1][2]["result"] == 1
    async with conn(srv.url, hello=False) as c:
        assert (await c.ok("hello", proto=1))["max_message"] == 2 << 20


def test_bad_size_names_the_option_and_the_examples(tmp_path):
    line = refused("--data-dir", str(tmp_path / "d"), "--max-limit", "memory_bytes=lots")
    assert "memory_bytes" in line and "bad size" in line and "512MiB" in line, line


def test_a_node_timeout_out_of_range_is_refused(tmp_path):
    for bad in ("500ms", "2h"):
        line = refused("--data-dir", str(tmp_path / "d"), "--node-timeout", bad)
        assert "--node-timeout must be from 1s to 1h" in line, line


# -- TLS ---------------------------------------------------------------------------------


def test_tls_problems_are_one_line_naming_the_file(tmp_path):
    cert, key = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed(other)
    data = str(tmp_path / "d")
    line = refused("--data-dir", data, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", key)
    assert "none.pem" in line and "No such file" in line, line
    line = refused("--data-dir", data, "--tls-cert", cert, "--tls-key", other_key)
    assert other_key in line and "does not belong" in line, line
    line = refused("--data-dir", data, "--tls-cert", key, "--tls-key", key)
    assert "--tls-cert " + key in line and "no PEM certificate" in line, line
    garbage = write(tmp_path / "garbage.pem", "not a key\n")
    line = refused("--data-dir", data, "--tls-cert", cert, "--tls-key", garbage)
    assert garbage in line and "private key" in line, line


# -- keys from a file --------------------------------------------------------------------


async def test_api_key_file_keeps_keys_off_the_command_line(make_server, tmp_path):
    keys = write(tmp_path / "keys", "# the team's keys\nk-one\n\n  k-two  \n")
    srv = make_server("--sandbox", "none", "--api-key-file", keys)
    with open(f"/proc/{srv.proc.pid}/cmdline", "rb") as f:
        assert b"k-one" not in f.read()
    for key in ("k-one", "k-two"):
        async with conn(srv.url, auth=key) as c:
            await c.ok("execute", code=RETURN_ONE, attach=False)
    async with conn(srv.url, auth="# the team's keys") as c:
        assert (await c.request("list"))["error"]["code"] == "unauthorized"


def test_key_files_that_cannot_be_used_are_refused(tmp_path):
    data = str(tmp_path / "d")
    open_file = write(tmp_path / "open", "k\n", mode=0o644)
    line = refused("--data-dir", data, "--api-key-file", open_file)
    assert open_file in line and "every user" in line, line
    empty = write(tmp_path / "empty", "# nothing yet\n")
    assert "holds no key" in refused("--data-dir", data, "--api-key-file", empty)
    assert "No such file" in refused("--data-dir", data, "--api-key-file", str(tmp_path / "missing"))


# -- the config file ---------------------------------------------------------------------


async def test_config_file_sets_options_and_flags_win(make_server, tmp_path):
    keys = write(tmp_path / "keys", "from-file\n")
    config = write(tmp_path / "bento.toml", f"""
sandbox = "none"
max_message = "3MiB"
api_key_file = ["{keys}"]
max_limit = {{memory_bytes = "512MiB", wall_s = "1h"}}
buffer_policy = "fail"
""")
    srv = make_server("--config", config, "--max-message", "5MiB", "--max-limit", "wall_s=2h")
    async with conn(srv.url, hello=False) as c:
        assert (await c.ok("hello", proto=1, auth="from-file"))["max_message"] == 5 << 20
        r = await c.request("execute", code=RETURN_ONE, limits={"wall_s": 3 * 3600})
        assert "7200" in r["error"]["message"], r
        r = await c.request("execute", code=RETURN_ONE, limits={"memory_bytes": 1 << 30})
        assert str(512 << 20) in r["error"]["message"], r
        r = await c.ok("execute", code=RETURN_ONE)
        assert (await c.frames(r["session"]))[-1][2]["result"] == 1


def test_config_file_mistakes_name_the_setting_and_the_file(tmp_path):
    data = str(tmp_path / "d")
    cases = [
        ("max_mesage = 5\n", "max_mesage", "unknown setting"),
        ("port = \"high\"\n", "port", "must be a whole number, not 'high'"),
        ("pool = \"x\"\n", "pool", "must be a whole number, not 'x'"),
        ("max_sessions = 0\n", "max_sessions", "must be at least 1, not 0"),
        ("quota_sessions = -3\n", "quota_sessions", "must be at least 0, not -3"),
        ("insecure = 1\n", "insecure", "true or false"),
        ("buffer_policy = \"sometimes\"\n", "buffer_policy", "not one of"),
        ("max_limit = \"512MiB\"\n", "max_limit", "must be a table"),
        ("max_limit = {memory_bytes = \"lots\"}\n", "memory_bytes", "bad size"),
        ("[keys.alice]\nrole = \"root\"\nkey = \"k\"\n", "keys.alice", "role"),
        ("[keys.alice]\nrole = \"admin\"\n", "keys.alice", "exactly one of"),
        ("[keys.alice]\nkey_hash = \"abc\"\n", "keys.alice", "64 hex digits"),
        ("data_dir = [\n", "", "not valid TOML"),
    ]
    for n, (text, name, message) in enumerate(cases):
        config = write(tmp_path / f"c{n}.toml", text)
        line = refused("--data-dir", data, "--config", config)
        assert config in line and name in line and message in line, (text, line)
    assert "No such file" in refused("--config", str(tmp_path / "absent.toml"))


def test_hash_key_prints_what_a_config_file_may_hold(tmp_path):
    from bento import auth

    r = subprocess.run([sys.executable, "-m", "bento.app", "server", "--hash-key"], input="s3cret\n",
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == auth.key_hash("s3cret"), r
