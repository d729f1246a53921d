"""Sandbox abuse: one test per attempt, each run against a server with ``--sandbox bwrap``
and again with ``--sandbox none``.

Each test asserts containment (from the exit frame, from the attack's own report, and
from the host side where the host can see it) *and* that the server stayed healthy
meanwhile: another session's echo round trip kept working within 3x its baseline, and
nothing of the attack outlived its session (abuse_kit.Abuse.run checks both).

With ``--sandbox none`` an attack that needs a real sandbox is a strict xfail, and one
that would harm this machine if nothing contained it (fork bomb, memory bomb,
``kill(-1)``, remount, an outside address, filling the root filesystem) is skipped,
never run. Known bugs are strict xfails whose reason starts with "sandbox bug:" or
"server bug:" (one racy bug is a non-strict xfail: "bug (racy):").
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys

import bento_sandbox
import cbor2
import psutil
import pytest
import trio
from abuse_kit import (
    MiB,
    Outcome,
    backends,
    open_client,
    pid_alive,
    prelude,
    read_pid,
    rss_of,
    sample_every,
    tagged_processes,
)
from helpers import drop

# Every attack checks that the server's echo stays within 3x of its baseline, and
# the memory bombs read the host's available memory: no other test runs beside them.
pytestmark = pytest.mark.alone

# -- network --------------------------------------------------------------------------

CONNECT = '''
import socket, time
def main(targets):
    out = {"interfaces": [name for _i, name in socket.if_nameindex()]}
    for host, port in targets:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1)
        t0 = time.monotonic()
        try:
            s.connect((host, port))
            out[f"{host}:{port}"] = "connected"
        except OSError as e:
            out[f"{host}:{port}"] = [e.errno, str(e), round(time.monotonic() - t0, 3)]
        finally:
            s.close()
    return out
'''


@backends(none="xfail", reason="a plain process shares the host's loopback")
async def test_tcp_connect_to_loopback(abuse):
    # A listener of our own on the host's loopback: if anything connects, its
    # backlog holds the connection and accept() returns it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        mine = listener.getsockname()[1]
        targets = [["127.0.0.1", abuse.server.port], ["127.0.0.1", mine]]
        out = await abuse.run(CONNECT, args=[targets])
        try:
            conn, peer = listener.accept()
        except BlockingIOError:
            reached = None
        else:
            conn.close()
            reached = peer
    rep = out.returned()
    for host, port in targets:
        assert rep[f"{host}:{port}"] != "connected", rep
        assert rep[f"{host}:{port}"][0] == errno.ECONNREFUSED, rep
    assert reached is None, f"the host's listener got a connection from {reached}"
    assert rep["interfaces"] == ["lo"], rep


@backends(none="skip", reason="a connection to an outside address would leave this machine")
async def test_tcp_connect_to_an_outside_address(abuse):
    # 192.0.2.1 is TEST-NET-1 (never routed); inside the sandbox there is no route at all.
    out = await abuse.run(CONNECT, args=[[["192.0.2.1", 80]]])
    rep = out.returned()
    res = rep["192.0.2.1:80"]
    assert res != "connected", rep
    assert res[0] in (errno.ENETUNREACH, errno.EHOSTUNREACH), rep
    assert res[2] < 0.5, "not refused at once: a route to the outside exists"
    assert rep["interfaces"] == ["lo"], rep
    assert out.enforced.get("network"), out.status


UNIX_CONNECT = '''
import os, socket
def main():
    out = []
    for path in api.recv():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        dfd = None
        try:
            if not path.startswith("\\0"):
                # Through the directory's fd: the path itself is too long for sun_path.
                dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
                path = f"/proc/self/fd/{dfd}/{os.path.basename(path)}"
            s.connect(path)
            out.append("connected")
        except OSError as e:
            out.append(e.errno)
        finally:
            s.close()
            if dfd is not None:
                os.close(dfd)
    return out
'''


@backends(none="xfail", reason="a plain process reaches the host's Unix sockets")
async def test_unix_socket_to_the_host(abuse):
    # An abstract socket of our own (abstract names are per network namespace) and
    # the other session's exchange control socket (a path in the data dir).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(f"\0bento-abuse-{abuse.uid}")
        listener.listen(8)
        listener.setblocking(False)

        async def send_paths(c, rep):
            paths = [f"\0bento-abuse-{abuse.uid}", os.path.join(abuse.health.session_dir, "ctl.sock")]
            assert os.path.exists(paths[1])
            await c.send({"op": "input", "session": rep["session"], "seq": 1, "data": paths})

        out = await abuse.run(UNIX_CONNECT, after_start=send_paths)
        try:
            conn, _peer = listener.accept()
        except BlockingIOError:
            reached = False
        else:
            conn.close()
            reached = True
    rep = out.returned()
    assert rep == [errno.ECONNREFUSED, errno.ENOENT], rep
    assert not reached, "the host's abstract socket got a connection"


# -- reading what is not the function's ------------------------------------------------

READ_SHADOW = '''
import hashlib
def main():
    try:
        with open("/etc/shadow", "rb") as f:
            data = f.read()
    except OSError as e:
        return {"read": False, "errno": e.errno}
    # Never the content itself: only proof that it was read.
    return {"read": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
'''


@backends(none="xfail", reason="a plain process (root here) reads the host's /etc/shadow")
async def test_read_etc_shadow(abuse):
    out = await abuse.run(READ_SHADOW)
    rep = out.returned()
    assert rep["read"] is False, rep
    assert rep["errno"] in (errno.ENOENT, errno.EACCES, errno.EPERM), rep
    if os.path.exists("/etc/shadow"):
        with open("/etc/shadow", "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert digest not in out.everything()


# Walks the given host paths (and, with through_proc, the same paths through every
# /proc/<pid>/root and cwd it can see), reading every file it can, and prints
# whatever it read. Unsandboxed it is run without through_proc: there those are the
# host's processes, and a path through the root of one whose file system hangs
# would hang the attack in the kernel; the direct paths show enough.
SNOOP = '''
import os, stat, time
DEADLINE = time.monotonic() + 10  # the report must come back well within the test's timeout

def grab(path, found):
    # Regular files only, opened without blocking: a FIFO or a device on the way
    # must not hang the attack (it would hang the test instead of failing it).
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            found[path] = os.read(fd, 1 << 16).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError as e:
        found[path] = f"error {e.errno}"

def snoop(path, found, budget):
    if os.path.isfile(path):
        grab(path, found)
        return
    try:
        for root, dirs, files in os.walk(path):
            for name in files:
                if budget[0] <= 0 or time.monotonic() > DEADLINE:
                    return
                budget[0] -= 1
                grab(os.path.join(root, name), found)
    except OSError:
        pass

def main(paths, through_proc):
    found, budget = {}, [500]
    bases = [""]
    for pid in os.listdir("/proc")[:200] if through_proc else ():
        if pid.isdigit() and int(pid) != os.getpid():
            bases += [f"/proc/{pid}/root", f"/proc/{pid}/cwd"]
    exists = {}
    for base in bases:
        if time.monotonic() > DEADLINE:
            break
        for path in paths:
            full = base + path
            exists[full] = os.path.exists(full)
            snoop(full, found, budget)
    for path, text in found.items():
        print(path, text[:2000])
    return {"exists": [p for p, e in exists.items() if e], "read": sorted(found)}
'''


@backends(none="xfail", reason="a plain process reads the server's data dir")
async def test_read_the_server_data_dir(abuse):
    data_dir = abuse.server.data_dir
    out = await abuse.run(SNOOP, args=[[data_dir, abuse.data_canary_path], abuse.sandboxed])
    rep = out.returned()
    assert abuse.canary not in out.everything(), "the data dir canary leaked"
    assert rep["exists"] == [], rep
    assert rep["read"] == [], rep


@backends(none="xfail", reason="a plain process reads other sessions' files")
async def test_read_another_session_log(abuse):
    health = None

    async def snoop_health(c, rep):
        nonlocal health
        health = abuse.health
        # The health session already wrote its canary to its log and its own home.
        # (Unsandboxed, its home is its work dir: no host path outside the test's own.)
        home = "/home/bento" if abuse.sandboxed else os.path.join(health.session_dir, "work")
        await c.send({"op": "input", "session": rep["session"], "seq": 1,
                      "data": [health.session_dir, os.path.join(home, "canary.txt")]})

    code = SNOOP.replace("def main(paths, through_proc):", "def main(through_proc):\n    paths = api.recv()")
    assert code != SNOOP
    out = await abuse.run(code, args=[abuse.sandboxed], after_start=snoop_health)
    rep = out.returned()
    assert health is not None and os.path.isdir(health.session_dir)
    # The log on the host really holds the canary (else this test proves nothing).
    on_disk = b""
    for root, _dirs, files in os.walk(health.session_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    on_disk += f.read()
    assert abuse.canary.encode() in on_disk
    assert abuse.canary not in out.everything(), "another session's canary leaked"
    assert health.session_dir not in rep["exists"], rep


LEAVE = '''
import os
def main(name, canary):
    for d in ("/tmp", os.path.expanduser("~")):
        with open(os.path.join(d, name), "w") as f:
            f.write(canary)
    return "left"
'''
FIND = '''
import os
def main(name):
    out = {}
    for d in ("/tmp", os.path.expanduser("~")):
        try:
            with open(os.path.join(d, name)) as f:
                out[d] = f.read()
        except OSError as e:
            out[d] = e.errno
    return out
'''


@backends(none="xfail", reason="a plain process shares the host's /tmp with every other session")
async def test_read_what_a_previous_session_left(abuse):
    # Sandboxes are started ahead of time (a warm pool): none may carry a previous
    # session's /tmp or home into the next one.
    name = f"bento-abuse-left-{abuse.uid}"
    abuse.host_path(f"/tmp/{name}")
    async with open_client(abuse.url) as c:
        r = await c.ok("execute", code=LEAVE, args=[name, abuse.canary + "-left"])
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["result"] == "left", ex
    out = await abuse.run(FIND, args=[name])
    rep = out.returned()
    assert abuse.canary not in out.everything(), rep
    assert set(rep.values()) == {errno.ENOENT}, rep


PROC = '''
import os
def main():
    host_pids = [*api.recv(), *api.recv()]
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    with open("/proc/1/cmdline", "rb") as f:
        init = f.read()
    seen = {}
    for pid in host_pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen[str(pid)] = f.read().decode("utf-8", "replace")
        except OSError as e:
            seen[str(pid)] = e.errno
    return {"pids": pids, "init": init, "me": os.getpid(), "seen": seen}
'''


@backends(none="xfail", reason="a plain process sees the host's /proc")
async def test_host_proc_is_not_visible(abuse):
    async def send_pids(c, rep):
        await _send_host_pids(abuse, c, rep)
        await c.send({"op": "input", "session": rep["session"], "seq": 2, "data": [os.getpid()]})

    out = await abuse.run(PROC, after_start=send_pids)
    rep = out.returned()
    host_pids = [*abuse.host_pids, os.getpid()]
    with open("/proc/1/cmdline", "rb") as f:
        host_init = f.read()
    assert rep["init"] != host_init, "pid 1 inside is the host's init"
    assert len(rep["pids"]) <= 8, f"sees {len(rep['pids'])} pids: {rep['pids'][:50]}"
    assert not set(host_pids) & set(rep["pids"]), (host_pids, rep["pids"])
    for pid in host_pids:
        assert rep["seen"][str(pid)] == errno.ENOENT, (pid, rep["seen"])


# -- writing where it must not ---------------------------------------------------------

WRITE = '''
import os
def main(paths):
    out = {}
    for path in paths:
        try:
            with open(path, "x") as f:
                f.write("written from the sandbox")
            out[path] = "written"
        except OSError as e:
            out[path] = e.errno
        d = path + ".d"
        try:
            os.mkdir(d)
            out[d] = "made"
        except OSError as e:
            out[d] = e.errno
    return out
'''


def _readonly_targets(abuse) -> list[str]:
    site = os.path.dirname(os.path.dirname(os.path.abspath(cbor2.__file__)))  # bound read-only
    name = f"bento-abuse-{abuse.uid}"
    return [
        abuse.host_path(os.path.join("/usr", name)),
        abuse.host_path(os.path.join("/usr/lib", name)),
        abuse.host_path(os.path.join(sys.base_prefix, name)),
        abuse.host_path(os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}."
                                     f"{sys.version_info[1]}", name + ".py")),
        abuse.host_path(os.path.join(site, name + ".pth")),
    ]


@backends(none="xfail", reason="a plain process (root here) writes into /usr and the Python prefix")
async def test_write_into_usr_and_the_python_prefix(abuse):
    paths = _readonly_targets(abuse)
    for p in paths:
        abuse.host_path(p + ".d")
    out = await abuse.run(WRITE, args=[paths])
    rep = out.returned()
    created = [p for p in paths + [p + ".d" for p in paths] if os.path.lexists(p)]
    assert created == [], f"created on the host: {created}"
    for path, res in rep.items():
        assert res in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT), (path, rep)
    assert rep[paths[0]] == errno.EROFS, rep


REMOUNT = '''
import ctypes, os, subprocess
MS_REMOUNT, MS_BIND = 32, 4096
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
def main(probe):
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    try:
        r = subprocess.run(["mount", "-o", "remount,rw", "/usr"], capture_output=True, timeout=10)
        out["mount_cmd"] = [r.returncode, r.stderr.decode(errors="replace")[-300:]]
    except OSError as e:
        out["mount_cmd"] = [None, str(e)]
    out["mount_syscall"] = [libc.mount(None, b"/usr", None, MS_REMOUNT | MS_BIND, None), ctypes.get_errno()]
    out["unshare"] = [libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), ctypes.get_errno()]
    if out["unshare"][0] == 0:
        out["mount_in_new_userns"] = [libc.mount(None, b"/usr", None, MS_REMOUNT | MS_BIND, None),
                                      ctypes.get_errno()]
    try:
        with open(probe, "x") as f:
            f.write("written after a remount")
        out["write"] = "written"
    except OSError as e:
        out["write"] = e.errno
    return out
'''


@backends(none="skip", reason="as root it would remount the host's /usr")
async def test_remount_a_readonly_bind_writable(abuse):
    probe = abuse.host_path(f"/usr/bento-abuse-remount-{abuse.uid}")
    out = await abuse.run(REMOUNT, args=[probe])
    rep = out.returned()
    assert not os.path.lexists(probe), "the sandbox wrote into the host's /usr"
    assert rep["mount_cmd"][0] != 0, rep
    assert rep["mount_syscall"][0] != 0, rep
    if rep["unshare"][0] == 0:
        assert rep["mount_in_new_userns"][0] != 0, rep
    assert rep["write"] == errno.EROFS, rep


# -- processes and memory ---------------------------------------------------------------

FORK_BOMB = '''
import os, time
def main(seconds):
    me = os.getpid()
    deadline = time.monotonic() + seconds
    forked = refused = 0
    last = None
    while time.monotonic() < deadline:
        try:
            pid = os.fork()
        except OSError as e:
            refused += 1
            last = e.errno
            time.sleep(0.001)
            continue
        if pid:
            forked += 1
    if os.getpid() != me:
        time.sleep(600)  # every child lingers: the sandbox must kill them all
        os._exit(0)
    return {"forked": forked, "refused": refused, "errno": last}
'''

PIDS = 64


@backends(none="skip", reason="nothing bounds a fork bomb without the pids cgroup")
async def test_fork_bomb(abuse):
    if "pids" not in bento_sandbox.detect_cgroups():
        pytest.skip("no usable pids cgroup on this machine: nothing would bound the fork bomb")
    counter = sample_every(0.1, "procs", lambda: len(tagged_processes(abuse.tag)), in_thread=True)
    out = await abuse.run(FORK_BOMB, args=[1.5], limits={"pids": PIDS, "wall_s": 15},
                          watchers=(counter,))
    assert out.exit["state"] in ("exited", "killed"), out.exit
    assert (out.exit["error"] or {}).get("message") != "wall_s", out.exit
    if out.exit["state"] == "exited":
        rep = out.returned()
        assert rep["refused"] > 0 and rep["errno"] == errno.EAGAIN, rep
        assert rep["forked"] < PIDS, rep
    seen = max(out.watched["procs"])
    assert 1 <= seen <= PIDS, f"{seen} processes of the session at once, limit {PIDS}"
    assert out.enforced.get("pids"), out.status
    # wait_no_tagged in run() already proved every child is gone.


FORK_MANY = '''
import os, time
def main(most):
    me = os.getpid()
    made = 0
    while made < most:  # bounded by the attack itself: this test must not hurt the host
        try:
            pid = os.fork()
        except OSError as e:
            return {"made": made, "errno": e.errno}
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        made += 1
    return {"made": made, "errno": None}
'''
FORK_MANY_MOST = 256


@backends(none="skip", reason="nothing bounds a fork bomb without the pids cgroup")
async def test_fork_bomb_without_a_pids_limit(abuse):
    out = await abuse.run(FORK_MANY, args=[FORK_MANY_MOST], limits={"wall_s": 20})
    rep = out.returned()
    assert rep["made"] < FORK_MANY_MOST, f"made {rep['made']} processes with nothing stopping it"
    assert out.enforced.get("pids"), out.status


MEMORY_BOMB = '''
def main():
    chunks = []
    try:
        for _ in range(64):  # 1 GiB in 16 MiB chunks, every page written
            chunks.append(b"\\x01" * (16 << 20))
    except MemoryError:
        return {"ok": False, "got": len(chunks)}
    return {"ok": True, "got": len(chunks)}
'''
MEMORY_LIMIT = 128 * MiB


def _tagged_rss(tag: str) -> int:
    total = 0
    for p in tagged_processes(tag):
        total += rss_of(p.pid)
    return total


def _memory_watchers(abuse):
    return (
        sample_every(0.02, "available", lambda: psutil.virtual_memory().available),
        sample_every(0.05, "rss", lambda: _tagged_rss(abuse.tag), in_thread=True),
    )


def _memory_contained(out: Outcome, available_before: int) -> None:
    ex = out.exit
    if ex["state"] == "killed":
        assert ex["signal"] == "KILL" and ex["result"] is None, ex
    else:
        assert ex["state"] == "exited", ex
        if ex["code"] == 0:
            assert ex["result"]["ok"] is False, ex
        else:
            assert ex["error"]["type"] == "MemoryError", ex
    drop = available_before - min(out.watched["available"])
    assert drop <= 256 * MiB, f"host available memory dropped by {drop / MiB:.0f} MiB"
    assert max(out.watched["rss"]) <= MEMORY_LIMIT + 16 * MiB, max(out.watched["rss"])


@backends(none="skip", reason="a memory bomb is not run unsandboxed")
async def test_memory_bomb(abuse):
    before = psutil.virtual_memory().available
    out = await abuse.run(MEMORY_BOMB, limits={"memory_bytes": MEMORY_LIMIT, "wall_s": 20},
                          watchers=_memory_watchers(abuse))
    _memory_contained(out, before)
    assert out.took < 10, out.took
    assert out.enforced.get("memory_bytes"), out.status


@backends(none="skip", reason="a memory bomb is not run unsandboxed")
async def test_memory_bomb_exit_names_the_limit(abuse):
    before = psutil.virtual_memory().available
    out = await abuse.run(MEMORY_BOMB, limits={"memory_bytes": MEMORY_LIMIT, "wall_s": 20},
                          watchers=_memory_watchers(abuse))
    _memory_contained(out, before)
    if out.exit["state"] != "killed":
        pytest.skip(f"not killed here (memory_bytes by {out.enforced.get('memory_bytes')}): "
                    "no limit kill to name")
    out.killed_by("memory_bytes")


# -- time limits ----------------------------------------------------------------------------

SPIN = '''
def main():
    while True:
        pass
'''


@backends(none="pass")
async def test_cpu_spin_past_cpu_s(abuse):
    out = await abuse.run(SPIN, limits={"cpu_s": 1, "wall_s": 20})
    ex = out.exit
    assert ex["state"] == "killed" and ex["code"] is None and ex["signal"], ex
    assert (ex["error"] or {}).get("message") != "wall_s", ex
    assert out.took < 8, out.took
    assert out.enforced.get("cpu_s"), out.status


@backends(none="pass")
async def test_cpu_spin_exit_names_the_limit(abuse):
    out = await abuse.run(SPIN, limits={"cpu_s": 1, "wall_s": 20})
    out.killed_by("cpu_s")
    assert out.took < 8, out.took


SLEEP = '''
import time
def main():
    time.sleep(30)
    return "slept"
'''


@backends(none="pass")
async def test_sleep_past_wall_s(abuse):
    out = await abuse.run(SLEEP, limits={"wall_s": 0.5})
    out.killed_by("wall_s")
    assert 0.4 <= out.took < 4, out.took
    assert out.enforced.get("wall_s"), out.status


DAEMON = '''
import os, time
def main():
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            # A daemon: its own session, none of the session's pipes held open.
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in range(0, 64):
                if fd != devnull:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            time.sleep(60)
        os._exit(0)
    os.waitpid(pid, 0)
    return "daemonized"
'''


# The none backend kills the environment's cgroup too, where one can be made here.
@backends(none="pass" if bento_sandbox.detect_cgroups() else "xfail",
          reason="without a cgroup, a setsid() daemon escapes the process group the none backend kills")
async def test_daemon_does_not_outlive_its_session(abuse):
    # abuse.run() fails if any tagged process is alive after the session ended.
    out = await abuse.run(DAEMON)
    assert out.returned() == "daemonized"


# -- filling things -------------------------------------------------------------------------

FILL = '''
import os
def main(paths, cap):
    out = {}
    chunk = b"\\x00" * (1 << 20)
    for path in paths:
        written, err = 0, None
        try:
            with open(path, "wb", buffering=0) as f:
                while written < cap:
                    written += f.write(chunk)
        except OSError as e:
            err = e.errno
        # The partial write that failed may have landed: count what is on disk.
        try:
            written = os.stat(path).st_size
            os.unlink(path)
        except OSError:
            pass
        out[path] = {"written": written, "errno": err}
    return out
'''
TMP_BYTES = 64 * MiB
FILL_CAP = TMP_BYTES + 32 * MiB  # an attack that gets this far has shown there is no bound


@backends(none="xfail", reason="a plain process writes into the host's /tmp")
async def test_fill_tmp(abuse):
    # (The home is the session's work dir on host disk, bounded by the exchange:
    # tests/e2e/test_files.py fills it.)
    name = f"bento-abuse-fill-{abuse.uid}"
    paths = [abuse.host_path(f"/tmp/{name}")]
    out = await abuse.run(FILL, args=[paths, FILL_CAP])
    rep = out.returned()
    for path in paths:
        res = rep[path]
        assert res["errno"] == errno.ENOSPC, (path, rep)
        assert res["written"] <= TMP_BYTES + MiB, (path, rep)
    assert not os.path.lexists(paths[0]), "the sandbox's /tmp is the host's /tmp"


@backends(none="skip", reason="it would write into the host's root filesystem")
async def test_fill_other_writable_places(abuse):
    name = f"bento-abuse-fill-{abuse.uid}"
    paths = [f"/{name}", f"/home/{name}", f"/dev/shm/{name}", f"/dev/{name}"]
    for p in paths:
        abuse.host_path(p)
    out = await abuse.run(FILL, args=[paths, FILL_CAP])
    rep = out.returned()
    for path in paths:
        res = rep[path]
        assert res["written"] <= TMP_BYTES + MiB, (path, rep)
        assert not os.path.lexists(path), path


FLOOD = '''
import os
def main():
    block = b"F" * (1 << 20)
    while True:  # GiBs, as fast as the pipes take them
        os.write(1, block)
        os.write(2, block)
'''
OUTPUT_LIMIT = 10_000_000


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@backends(none="pass")
async def test_flood_output_past_output_bytes(abuse):
    pid = abuse.server.proc.pid
    peak_before = _peak_rss(pid)
    out = await abuse.run(FLOOD, limits={"output_bytes": OUTPUT_LIMIT, "wall_s": 30})
    out.killed_by("output_bytes")
    got = len(out.stdout) + len(out.stderr)
    assert 0 < got <= OUTPUT_LIMIT, got
    assert set(out.stdout) <= {ord("F")} and set(out.stderr) <= {ord("F")}
    assert out.took < 10, out.took
    # Its peak over the flood and the replay of those 10 MB to the attack's client.
    grew = _peak_rss(pid) - peak_before
    assert grew <= 64 * MiB, f"server peak RSS grew by {grew / MiB:.0f} MiB for 10 MB of output"
    assert out.enforced.get("output_bytes"), out.status


@backends()
async def test_detach_while_a_flood_streams(abuse):
    # Not an attack from inside: the owner detaches while the flood is being pushed
    # to it. It reads nothing first, so once the flood has ended (32 MB, far beyond
    # what the loopback socket buffers hold) the server is surely blocked mid-send.
    limit = 32_000_000
    detached = status = None
    with trio.CancelScope() as dropped:
        async with open_client(abuse.url) as c, open_client(abuse.url) as watcher:
            r = await c.ok("execute", code=prelude(abuse.tag) + FLOOD,
                           limits={"output_bytes": limit, "wall_s": 30})
            with trio.fail_after(20):
                while (st := await watcher.ok("status", token=r["token"]))["exit"] is None:
                    await trio.sleep(0.05)
            assert st["exit"]["error"] == {"type": "LimitExceeded", "message": "output_bytes"}, st["exit"]
            try:
                detached = await c.request("detach", session=r["session"], timeout=3)
                status = await c.request("status", token=r["token"], timeout=3)
            except trio.TooSlowError:
                drop(c, dropped)  # the stream is garbage
    assert detached is not None and detached["ok"], "no reply to detach: the connection is wedged"
    assert status is not None and status["ok"], status
    assert not await abuse.wait_no_tagged()


MSG_FLOOD = '''
def main():
    value = "M" * 65536
    while True:
        api.send(value)
'''


@backends(none="pass")
async def test_flood_messages_past_output_bytes(abuse):
    out = await abuse.run(MSG_FLOOD, limits={"output_bytes": OUTPUT_LIMIT, "wall_s": 30})
    out.killed_by("output_bytes")
    msgs = [f[2] for f in out.frames if f[1] == "msg"]
    assert 0 < sum(len(cbor2.dumps(m)) for m in msgs) <= OUTPUT_LIMIT
    assert out.took < 10, out.took


CLOSE_STDIO = '''
import os, sys, time
def main():
    print("bye, stdio")
    sys.stdout.flush()
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(1)
    return 5
'''


@backends(none="pass")
async def test_close_stdio_and_keep_running(abuse):
    out = await abuse.run(CLOSE_STDIO, limits={"wall_s": 20})
    assert out.exit == {"state": "exited", "code": 0, "signal": None, "result": 5, "error": None}
    assert out.stdout == b"bye, stdio\n"
    assert out.took >= 1, out.took


SPOOF = '''
import os, struct, time
def main():
    # A frame header on the driver's message pipe announcing a 4 GiB message.
    os.write(4, struct.pack(">I", 0xFFFFFFF0) + b"\\xa0" * 65536)
    time.sleep(10)
    return "still running"
'''


@backends(none="pass")
async def test_forged_message_on_the_driver_pipe(abuse):
    out = await abuse.run(SPOOF, limits={"wall_s": 20})
    ex = out.exit
    assert ex["state"] == "killed" and ex["result"] is None, ex
    assert (ex["error"] or {}).get("type") == "ProtocolViolation", ex
    assert out.took < 5, out.took


# -- signals and ptrace ---------------------------------------------------------------------

async def _send_host_pids(abuse, c, rep) -> None:
    """After start: tell the attack the host pids of the server and both exchanges."""
    pids = [abuse.server.proc.pid]
    with trio.fail_after(10):
        while True:
            ours = read_pid(os.path.join(abuse.session_dir(rep["session"]), "exchange.pid"))
            if ours is not None:
                break
            await trio.sleep(0.02)
    theirs = read_pid(os.path.join(abuse.health.session_dir, "exchange.pid"))
    pids += [ours, theirs]
    abuse.host_pids = pids
    await c.send({"op": "input", "session": rep["session"], "seq": 1, "data": pids})


KILL_PARENT = '''
import os, signal, time
def main():
    host_pids = api.recv()
    out = {"ppid": os.getppid()}
    for pid in [os.getppid(), *host_pids]:
        try:
            os.kill(pid, signal.SIGKILL)
            out[str(pid)] = "sent"
        except OSError as e:
            out[str(pid)] = e.errno
    time.sleep(0.3)
    return out
'''


@backends(none="xfail", reason="a plain process can kill its exchange and the server")
async def test_signal_the_parent(abuse):
    out = await abuse.run(KILL_PARENT, limits={"wall_s": 20},
                          after_start=lambda c, rep: _send_host_pids(abuse, c, rep))
    server, ours, theirs = abuse.host_pids
    # The exchange recorded a real end: it was not killed (that would be "lost"),
    # and the health session's echo ran to its end, so its exchange lived too.
    # (Both exchanges exit once their session has ended: an ended session
    # costs no process, so their pids prove nothing now.)
    assert out.exit["state"] in ("exited", "killed"), out.exit
    assert pid_alive(server)
    if out.exit["state"] == "exited":
        rep = out.returned()
        for pid in (server, ours, theirs):
            assert rep[str(pid)] == errno.ESRCH, rep


KILL_ALL = '''
import os, signal, subprocess, time
def main():
    child = subprocess.Popen(["sleep", "30"])
    os.kill(-1, signal.SIGKILL)
    time.sleep(0.3)
    return {"child": child.poll()}
'''


@backends(none="skip", reason="kill(-1) as root would kill every process on this machine")
async def test_kill_minus_one(abuse):
    async def note_pids(c, rep):
        with trio.fail_after(10):
            while read_pid(os.path.join(abuse.session_dir(rep["session"]), "exchange.pid")) is None:
                await trio.sleep(0.02)
        abuse.host_pids = [
            abuse.server.proc.pid, os.getpid(), os.getppid(),
            read_pid(os.path.join(abuse.session_dir(rep["session"]), "exchange.pid")),
            read_pid(os.path.join(abuse.health.session_dir, "exchange.pid")),
        ]

    out = await abuse.run(KILL_ALL, limits={"wall_s": 20}, after_start=note_pids)
    assert out.exit["state"] in ("exited", "killed"), out.exit
    if out.exit["state"] == "exited":
        # It did run kill(-1), and it reached only its own sandbox: its child.
        assert out.returned()["child"] == -9, out.exit
    # The server and this test runner lived through it; both exchanges did too:
    # this session ended "exited"/"killed", not "lost", and the health session's
    # echo ran to its end (they exit once their session has ended, so their
    # pids prove nothing now).
    dead = [pid for pid in abuse.host_pids[:3] if not pid_alive(pid)]
    assert not dead, f"killed from inside the sandbox: {dead}"


PTRACE = '''
import ctypes, os
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000
def main(inside):
    targets = [*inside, *api.recv()]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    out = {}
    for pid in targets:
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
            try:
                os.waitpid(pid, WALL)
            except ChildProcessError:
                pass
            libc.ptrace(PTRACE_DETACH, pid, None, None)
            out[str(pid)] = "attached"
        else:
            out[str(pid)] = ctypes.get_errno()
    return out
'''


@backends(none="xfail", reason="a plain process (root here) can ptrace the server and exchanges")
async def test_ptrace_another_process(abuse):
    # Inside the sandbox pid 1 is the sandbox's own init: attaching to it is no escape
    # (and is not tried unsandboxed, where pid 1 is this machine's init).
    inside = [1] if abuse.sandboxed else []
    out = await abuse.run(PTRACE, args=[inside], limits={"wall_s": 20},
                          after_start=lambda c, rep: _send_host_pids(abuse, c, rep))
    rep = out.returned()
    for pid in abuse.host_pids:
        assert rep[str(pid)] in (errno.ESRCH, errno.EPERM), (pid, rep)
    # (The exchanges exit once their session has ended: only the server is still to be alive.)
    assert pid_alive(abuse.host_pids[0])
