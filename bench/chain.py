"""Figures through the whole chain: a real ``bento server`` process, its
exchanges, the driver in its environment, and a WebSocket client (this process).

Every function here is bounded in count and time, and cleans up the sessions
it made (the caller stops the server, which ends whatever is left)."""

from __future__ import annotations

import os
import random
import statistics
from collections.abc import Callable
from typing import Any

import cbor2
import psutil
import trio
from client import StreamCount, next_message, now, open_client, read_stream, request

CODE_PRINT = "def main():\n    print('x')\n"
CODE_ECHO = "def main():\n    while True:\n        api.send(api.recv())\n"
CODE_BIG = (
    "import sys\n"
    "def main(n):\n"
    "    b = b'x' * 65536\n"
    "    w = sys.stdout.buffer.write\n"
    "    for _ in range(n):\n"
    "        w(b)\n"
    "    sys.stdout.flush()\n"
)
CODE_SMALL = (
    "def main(n):\n"
    "    b = b'x' * 100\n"
    "    send = api.send\n"
    "    for _ in range(n):\n"
    "        send(b)\n"
)
CODE_WAIT = "def main():\n    api.recv()\n"
CODE_FEW = "def main():\n    for i in range(10):\n        api.send(i)\n"

ENDED = ("exited", "failed", "killed", "lost")
FRAME = 65536


async def _until_exit(c, sid: str, timeout: float = 30) -> dict:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while True:
            msg = await next_message(c)
            if msg.get("ev") == "out" and msg.get("session") == sid:
                for _seq, ch, data in msg["frames"]:
                    if ch == "exit":
                        return data
            elif msg.get("ev") == "error" and msg.get("session") == sid:
                raise RuntimeError(f"error event: {msg.get('error')}")


async def destroy(c, token: str) -> None:  # type: ignore[no-untyped-def]
    r = await c.request("destroy", token=token)
    if not r.get("ok") and r.get("error", {}).get("code") != "not_found":
        raise RuntimeError(f"destroy failed: {r.get('error')}")


async def wait_ended(c, token: str, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    """Poll ``status`` until the function has ended; the last status."""
    with trio.fail_after(timeout):
        while True:
            st = await request(c, "status", token=token)
            if st["state"] in ENDED:
                return st
            await trio.sleep(0.05)


# -- execute -> first output -------------------------------------------------------


async def first_output_once(c, packages: list[str] | None = None,  # type: ignore[no-untyped-def]
                            timeout: float = 30) -> float:
    """Seconds from sending execute (with ``packages``, if any) to the first stdout frame."""
    t0 = now()
    extra = {"packages": packages} if packages else {}
    r = await request(c, "execute", code=CODE_PRINT, **extra)
    sid = r["session"]
    t1 = None
    exit_data = None
    with trio.fail_after(timeout):
        while t1 is None:
            msg = await next_message(c)
            if msg.get("ev") == "error" and msg.get("session") == sid:
                raise RuntimeError(f"error event: {msg.get('error')}")
            if msg.get("ev") != "out" or msg.get("session") != sid:
                continue
            for _seq, ch, data in msg["frames"]:
                if ch == "stdout" and t1 is None:
                    t1 = now()
                elif ch == "exit":
                    exit_data = data
            if exit_data is not None and t1 is None:
                raise RuntimeError(f"exited without output: {exit_data}")
    if exit_data is None:
        exit_data = await _until_exit(c, sid)
    if exit_data.get("state") != "exited":
        raise RuntimeError(f"print('x') ended {exit_data}")
    await destroy(c, r["token"])
    return t1 - t0


async def first_output(url: str, runs: int, warmup: int = 2, pause: float = 0.05) -> list[float]:
    out = []
    async with open_client(url) as c:
        for i in range(warmup + runs):
            dt = await first_output_once(c)
            if i >= warmup:
                out.append(dt)
            await trio.sleep(pause)  # let the previous session's teardown finish
    return out


async def first_output_against(url: str, others: list, runs: int,  # type: ignore[type-arg]
                               pause: float) -> tuple[list[float], list[list[float]]]:
    """Seconds to the first output, interleaved with ``others`` (objects with a
    blocking ``once()`` that returns the same figure for another system): each
    round one execute here and one ``once()`` each, in a random order, ``pause``
    after each, so the machine's drift hits all alike. (ours, [theirs...])."""
    ours: list[float] = []
    theirs: list[list[float]] = [[] for _ in others]
    async with open_client(url) as c:
        await first_output_once(c)
        await trio.sleep(pause)
        for _ in range(runs):
            order = list(range(len(others) + 1))
            random.shuffle(order)
            for i in order:
                if i == len(others):
                    ours.append(await first_output_once(c))
                else:
                    theirs[i].append(await trio.to_thread.run_sync(others[i].once))
                await trio.sleep(pause)
    return ours, theirs


async def packages_first_output(url: str, spec: list[str], runs: int,
                                pause: float) -> tuple[float, list[float], list[float]]:
    """Seconds to the first output: the first execute of a new packages ``spec``
    (its environment is built), then ``runs`` executes with the cached spec,
    each followed by one without packages (the same server, the same pauses)."""
    cached, plain = [], []
    async with open_client(url) as c:
        new = await first_output_once(c, spec, timeout=300)
        for _ in range(runs):
            await trio.sleep(pause)
            cached.append(await first_output_once(c, spec))
            await trio.sleep(pause)
            plain.append(await first_output_once(c))
    return new, cached, plain


async def cold_first_output(url: str) -> float:
    """The first execute on a server that has not run anything yet."""
    async with open_client(url) as c:
        return await first_output_once(c)


# -- echo ---------------------------------------------------------------------------


async def echo_rtts(url: str, n: int, warmup: int = 20) -> list[float]:
    """Round trips input -> function's api.send -> client, seconds each."""
    out = []
    async with open_client(url) as c:
        r = await request(c, "execute", code=CODE_ECHO)
        sid = r["session"]
        try:
            with trio.fail_after(30 + n * 0.1):
                for i in range(1, warmup + n + 1):
                    t0 = now()
                    await c.send({"op": "input", "session": sid, "seq": i, "data": i})
                    done = False
                    while not done:
                        msg = await next_message(c)
                        ev = msg.get("ev")
                        if ev == "error" and msg.get("session") == sid:
                            raise RuntimeError(f"error event: {msg.get('error')}")
                        if ev != "out" or msg.get("session") != sid:
                            continue
                        for seq, ch, data in msg["frames"]:
                            if ch == "exit":
                                raise RuntimeError(f"echo function ended: {data}")
                            if ch == "msg" and data == i:
                                done = True
                                last = seq
                    dt = now() - t0
                    if i > warmup:
                        out.append(dt)
                    if i % 64 == 0:
                        await c.send({"op": "ack", "session": sid, "seq": last})
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await destroy(c, r["token"])
    return out


# -- streaming ----------------------------------------------------------------------


class CpuProbe:
    """CPU used per role (server, exchange, environment = the sandbox's processes + driver,
    client) between two points of a stream run: when a quarter and when three
    quarters of the volume have arrived, so every process is still alive and
    start-up and tear-down are left out. Shares are of one core."""

    def __init__(self, server_pid: int, data_dir: str, expect: int) -> None:
        self.server_pid, self.data_dir, self.expect = server_pid, data_dir, expect
        self.sid = ""
        self.start: tuple[float, dict[str, float]] | None = None
        self.shares: dict[str, float] | None = None

    def _pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"server": [self.server_pid], "client": [os.getpid()]}
        sdir = os.path.join(self.data_dir, "sessions", self.sid)
        epid = _read_pid(os.path.join(sdir, "exchange.pid"))
        vpid = _read_pid(os.path.join(sdir, "env.pid"))
        if epid:
            out["exchange"] = [epid]
        if vpid:
            try:
                p = psutil.Process(vpid)
                out["environment"] = [vpid, *(q.pid for q in p.children(recursive=True))]
            except psutil.NoSuchProcess:
                pass
        return out

    def _cpu(self) -> dict[str, float]:
        res = {}
        for role, pids in self._pids().items():
            total = 0.0
            for pid in pids:
                try:
                    t = psutil.Process(pid).cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            res[role] = total
        return res

    def __call__(self, counter: StreamCount) -> None:
        if self.start is None and counter.total >= self.expect // 4:
            self.start = (now(), self._cpu())
        elif self.start is not None and self.shares is None and counter.total >= self.expect * 3 // 4:
            t0, c0 = self.start
            dt, c1 = now() - t0, self._cpu()
            if dt > 0:
                self.shares = {k: (c1[k] - c0.get(k, 0.0)) / dt for k in c1 if k in c0}


async def stream_live(url: str, kind: str, amount: int, probe: CpuProbe | None = None) -> float:
    """Live rate while the function runs, acking as we go (policy block).

    kind "big": ``amount`` bytes of 64 KiB stdout writes -> bytes/s.
    kind "small": ``amount`` api.send of 100 bytes -> frames/s."""
    if kind == "big":
        code, arg, unit, expect = CODE_BIG, amount // FRAME, "bytes", (amount // FRAME) * FRAME
        buffer = {"max_bytes": 16 * 1024 * 1024, "policy": "block"}
    else:
        code, arg, unit, expect = CODE_SMALL, amount, "frames", amount
        buffer = {"max_bytes": 64 * 1024 * 1024, "policy": "block"}
    async with open_client(url) as c:
        r = await request(c, "execute", code=code, args=[arg], buffer=buffer)
        if probe is not None:
            probe.sid, probe.expect = r["session"], expect
        try:
            with trio.fail_after(120):
                counter = await read_stream(c, r["session"], StreamCount(unit), ack=True, on_message=probe)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await destroy(c, r["token"])
    _check(counter, expect, "live")
    return counter.rate()


async def stream_replay(url: str, kind: str, amount: int, probe: CpuProbe | None = None) -> float:
    """The same volume read back by a fresh attach from seq 1 after the function ended."""
    if kind == "big":
        code, arg, unit, expect = CODE_BIG, amount // FRAME, "bytes", (amount // FRAME) * FRAME
        max_bytes = amount + 16 * 1024 * 1024
    else:
        code, arg, unit, expect = CODE_SMALL, amount, "frames", amount
        max_bytes = amount * 120 + 16 * 1024 * 1024
    async with open_client(url) as c:
        r = await request(c, "execute", code=code, args=[arg], attach=False,
                          buffer={"max_bytes": max_bytes, "policy": "block"})
        try:
            st = await wait_ended(c, r["token"], timeout=120)
            if st["state"] != "exited":
                raise RuntimeError(f"writer ended {st['state']}: {st.get('exit')}")
            if probe is not None:
                probe.sid, probe.expect = r["session"], expect
            async with open_client(url) as reader:
                await request(reader, "attach", token=r["token"], **{"from": 1})
                with trio.fail_after(120):
                    counter = await read_stream(reader, r["session"], StreamCount(unit), ack=False,
                                                on_message=probe)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await destroy(c, r["token"])
    _check(counter, expect, "replay")
    return counter.rate()


def _check(counter: StreamCount, expect: int, what: str) -> None:
    if counter.gaps:
        raise RuntimeError(f"{what}: {counter.gaps} gap frames")
    if counter.total != expect:
        raise RuntimeError(f"{what}: received {counter.total}, expected {expect}")
    if counter.exit is None or counter.exit.get("state") != "exited":
        raise RuntimeError(f"{what}: function ended {counter.exit}")


# -- reattach ------------------------------------------------------------------------


async def reattach(url: str, runs: int, warmup: int = 2) -> list[float]:
    """Connect (WebSocket + hello) and attach from seq 1 -> first replayed frame."""
    out = []
    async with open_client(url) as c:
        r = await request(c, "execute", code=CODE_FEW, attach=False)
        try:
            await wait_ended(c, r["token"], timeout=30)
            for i in range(warmup + runs):
                t0 = now()
                async with open_client(url) as c2:
                    await c2.send({"op": "attach", "id": 1, "token": r["token"], "from": 1})
                    with trio.fail_after(10):
                        while True:
                            msg = await next_message(c2)
                            if msg.get("id") == 1 and not msg.get("ok"):
                                raise RuntimeError(f"attach failed: {msg}")
                            if msg.get("ev") == "out" and msg["frames"]:
                                break
                    dt = now() - t0
                if i >= warmup:
                    out.append(dt)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await destroy(c, r["token"])
    return out


# -- many sessions ---------------------------------------------------------------------


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _tree_memory(pid: int) -> tuple[int, int]:
    """RSS and PSS summed over a process and its descendants."""
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    r = s = 0
    for q in procs:
        try:
            m = q.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        r += m.rss
        s += m.pss
    return r, s


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _exchange_states(data_dir: str, ids: set[str]) -> dict[str, int]:
    """Session states as each exchange recorded them (its state.cbor)."""
    out: dict[str, int] = {}
    for sid in ids:
        try:
            with open(os.path.join(data_dir, "sessions", sid, "state.cbor"), "rb") as f:
                state = cbor2.loads(f.read()).get("state", "?")
        except (OSError, ValueError, cbor2.CBORDecodeError, AttributeError):
            state = "unknown"
        out[state] = out.get(state, 0) + 1
    return out


def available_memory() -> int:
    return psutil.virtual_memory().available


async def many_sessions(url: str, server_pid: int, data_dir: str, n: int, sample: int,
                        echo_n: int, workers: int = 8, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Start ``n`` sessions that wait in api.recv(), measure memory per session,
    echo latency on one more session while they run, then destroy them all."""
    res: dict[str, Any] = {"n_asked": n}
    error = _error_counter(res)
    base_rss = await _warm_baseline(url, server_pid)

    t_start = now()
    made = await _start_many(url, n, CODE_WAIT, workers, error)
    res["start_s"] = now() - t_start
    res["start_rate"] = len(made) / res["start_s"]
    log(f"    {len(made)} sessions started in {res['start_s']:.1f} s")

    try:
        # Wait until every function runs (its driver is up, waiting in recv).
        # The exchange's own record (state.cbor) is the authority; the server's
        # ``list`` is checked too, and a disagreement is reported.
        ids = {r["session"] for r in made}
        by_exchange: dict[str, int] = {}
        with trio.move_on_after(max(30, n * 0.05)):
            while True:
                by_exchange = _exchange_states(data_dir, ids)
                if by_exchange.get("running", 0) >= len(ids):
                    break
                await trio.sleep(0.25)
        async with open_client(url) as c:
            listed = (await request(c, "list", timeout=60))["sessions"]
        by_server: dict[str, int] = {}
        for s in listed:
            if s["session"] in ids:
                by_server[s["state"]] = by_server.get(s["state"], 0) + 1
        res["states_exchange"], res["states_server"] = by_exchange, by_server
        running = by_exchange.get("running", 0)
        for _ in range(len(made) - running):
            error("not running")
        res["running"] = running
        log(f"    states per the exchanges: {by_exchange}; per the server's list: {by_server}")
        await trio.sleep(1.0)
        after_rss = rss(server_pid)
        res["server_rss_base"] = base_rss
        res["server_rss_after"] = after_rss
        res["server_per_session"] = (after_rss - base_rss) / max(1, len(made))

        # Memory of a sample of exchanges and environments.
        sids = [r["session"] for r in made]
        step = max(1, len(sids) // max(1, sample))
        ex_rss, ex_pss, env_rss, env_pss = [], [], [], []
        for sid in sids[::step][:sample]:
            sdir = os.path.join(data_dir, "sessions", sid)
            epid = _read_pid(os.path.join(sdir, "exchange.pid"))
            vpid = _read_pid(os.path.join(sdir, "env.pid"))
            try:
                if epid:
                    m = psutil.Process(epid).memory_full_info()
                    ex_rss.append(m.rss)
                    ex_pss.append(m.pss)
                if vpid:
                    r_, p_ = _tree_memory(vpid)
                    env_rss.append(r_)
                    env_pss.append(p_)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                error("memory: process gone")
        res.update(ex_rss=ex_rss, ex_pss=ex_pss, env_rss=env_rss, env_pss=env_pss)
        if ex_rss:
            log(f"    exchange RSS median {statistics.median(ex_rss) / 2**20:.1f} MiB, "
                f"environment RSS median {statistics.median(env_rss or [0]) / 2**20:.1f} MiB")

        # Echo on one more session while they all run.
        try:
            res["echo"] = await echo_rtts(url, echo_n)
        except Exception as exc:  # noqa: BLE001 - counted, and reported
            error(f"echo: {exc}")
            res["echo"] = []
        # Still all running?
        still = _exchange_states(data_dir, ids).get("running", 0)
        for _ in range(running - still):
            error("ended while others ran")
    finally:
        t0 = now()
        await _destroy_all(url, made, workers, error)
        res["destroy_s"] = now() - t0
        log(f"    destroyed in {res['destroy_s']:.1f} s")
    return res


def _error_counter(res: dict[str, Any]) -> Callable[[str], None]:
    """A function that counts errors by kind into ``res`` (errors, error_kinds)."""
    res.update(errors=0, error_kinds={})

    def error(kind: str) -> None:
        res["errors"] += 1
        res["error_kinds"][kind] = res["error_kinds"].get(kind, 0) + 1

    return error


async def _warm_baseline(url: str, server_pid: int) -> int:
    """The server's RSS once it is warmed up (imports, a first exchange) and idle."""
    async with open_client(url) as c:
        await first_output_once(c)
    await trio.sleep(1.0)
    return rss(server_pid)


async def _start_many(url: str, n: int, code: str, workers: int, error: Callable[[str], None]) -> list[dict]:
    """``n`` executes of ``code`` (not attached) from ``workers`` connections: their replies."""
    made: list[dict] = []
    next_i = 0

    async def starter() -> None:
        nonlocal next_i
        async with open_client(url) as c:
            while next_i < n:
                next_i += 1
                try:
                    r = await c.request("execute", code=code, attach=False, timeout=60)
                except trio.TooSlowError:
                    error("execute timeout")
                    continue
                if r.get("ok"):
                    made.append(r)
                else:
                    error(f"execute {r.get('error', {}).get('code')}")

    with trio.fail_after(max(60, n * 0.25)):
        async with trio.open_nursery() as nursery:
            for _ in range(min(workers, n)):
                nursery.start_soon(starter)
    return made


async def _destroy_all(url: str, made: list[dict], workers: int, error: Callable[[str], None]) -> None:
    pending = list(made)

    async def destroyer() -> None:
        async with open_client(url) as c:
            while pending:
                r = pending.pop()
                try:
                    await destroy(c, r["token"])
                except Exception:  # noqa: BLE001 - counted
                    error("destroy")

    with trio.CancelScope(shield=True), trio.move_on_after(max(60, len(made) * 0.2)):
        async with trio.open_nursery() as nursery:
            for _ in range(min(workers, max(1, len(made)))):
                nursery.start_soon(destroyer)


async def ended_sessions(url: str, server_pid: int, data_dir: str, n: int, workers: int = 8,
                         log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """``n`` sessions whose functions ended and whose output nobody read or
    acked: what they cost the server (RSS per session) and how many processes
    are still alive for them once the exchanges had time to hand them over."""
    res: dict[str, Any] = {}
    error = _error_counter(res)
    base_rss = await _warm_baseline(url, server_pid)
    made = await _start_many(url, n, CODE_FEW, workers, error)
    try:
        ids = {r["session"] for r in made}
        pids: dict[str, int] = {}
        with trio.move_on_after(max(30, n * 0.05)):
            while True:
                states = _exchange_states(data_dir, ids)
                for sid in ids - set(pids):
                    pid = _read_pid(os.path.join(data_dir, "sessions", sid, "exchange.pid"))
                    if pid:
                        pids[sid] = pid
                alive = [pid for pid in pids.values() if psutil.pid_exists(pid)]
                if states.get("exited", 0) >= len(ids) and not alive:
                    break
                await trio.sleep(0.25)
        res["states"] = states
        for _ in range(len(ids) - states.get("exited", 0)):
            error("not exited")
        await trio.sleep(1.0)
        alive_rss = 0
        alive = 0
        for pid in pids.values():
            try:
                alive_rss += psutil.Process(pid).memory_info().rss
                alive += 1
            except psutil.NoSuchProcess:
                pass
        res.update(n=len(made), processes=alive, processes_rss=alive_rss, server_rss_base=base_rss,
                   server_rss_after=rss(server_pid))
        res["server_per_session"] = (res["server_rss_after"] - base_rss) / max(1, len(made))
        log(f"    {len(made)} ended sessions: {alive} exchange processes alive, server RSS "
            f"{base_rss / 2**20:.1f} -> {res['server_rss_after'] / 2**20:.1f} MiB")
    finally:
        await _destroy_all(url, made, workers, error)
    return res


# -- unread backlog ---------------------------------------------------------------------


async def backlog(url: str, server_pid: int, amount: int, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Server RSS while a function writes ``amount`` bytes nobody reads."""
    async with open_client(url) as c:
        await first_output_once(c)
        await trio.sleep(1.0)
        base = rss(server_pid)
        peak = base
        n = amount // FRAME
        t0 = now()
        r = await request(c, "execute", code=CODE_BIG, args=[n], attach=False,
                          buffer={"max_bytes": n * FRAME + 64 * 1024 * 1024, "policy": "block"})
        done = trio.Event()

        async def sampler() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss(server_pid))
                with trio.move_on_after(0.05):
                    await done.wait()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler)
                try:
                    st = await wait_ended(c, r["token"], timeout=max(60, amount / 2**20 * 0.2))
                finally:
                    done.set()
            write_s = now() - t0
            await trio.sleep(0.5)
            end = rss(server_pid)
            peak = max(peak, end)
            st = await request(c, "status", token=r["token"])
            if st["state"] != "exited":
                raise RuntimeError(f"writer ended {st['state']}: {st.get('exit')}")
            if st["buffer_bytes"] < n * FRAME:
                raise RuntimeError(f"only {st['buffer_bytes']} bytes buffered of {n * FRAME}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await destroy(c, r["token"])
    log(f"    {n * FRAME / 2**20:.0f} MiB buffered in {write_s:.1f} s; server RSS "
        f"{base / 2**20:.1f} -> peak {peak / 2**20:.1f}, end {end / 2**20:.1f} MiB")
    return {"base": base, "peak": peak, "end": end, "buffered": st["buffer_bytes"], "write_s": write_s}
