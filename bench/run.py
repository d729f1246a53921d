"""Bento benchmark: one command, a few minutes, one table.

    python bench/run.py            # full: ~5 minutes
    python bench/run.py --quick    # ~1 minute, same rows, smaller volumes
    python bench/run.py --quick --smoke   # ~30 s, tiny volumes (the smoke test)
    python bench/run.py --json out.json   # also write the results as JSON

Every figure is compared against a ceiling measured in the same run on the
same machine (a bare trio-websocket + CBOR server, a bare ``python -I -S``
start, bare or inside the server's bwrap command line). Client, server,
exchanges and functions share this machine's cores: the figures say what one
machine does with everything on it, not what a server does with a remote client.

Progress goes to stderr, the table to stdout. Exit status: 0 when every row was
measured (met or not), 1 when a stage failed, 130 on Ctrl-C. Everything started
is stopped on the way out: servers by pid, with their exchanges and sandboxes.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, os.path.join(ROOT, "tests"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import backtoback  # noqa: E402
import ceilings  # noqa: E402
import chain  # noqa: E402
import jupyter_ceiling  # noqa: E402
import multinode  # noqa: E402
import node_client  # noqa: E402
import psutil  # noqa: E402
import trio  # noqa: E402
from common import (  # noqa: E402
    BUDGETS,
    LEGEND,
    Budget,
    MiB,
    Row,
    Sample,
    footnotes,
    machine_info,
    machine_text,
    settle,
    table,
)
from helpers import ServerProcess  # noqa: E402

MS = 1000.0
PACKAGES = ("six",)  # small and pure Python: the build measures the server, not a compiler
CAPACITY = ("--max-sessions", "100000", "--memory-budget", "100T")
MAX_BUFFER = str(2 * 1024 * 1024 * 1024)

# key, name, unit, higher_is_better, target (judged on p50 in Bench.finish; "-": reported only)
ROW_SPECS: list[tuple[str, str, str, bool, str]] = [
    ("first_bwrap", "execute->first output, bwrap, warm", "ms", False, "p50 <= 5 ms"),
    ("first_jupyter", "execute->first output vs warm Jupyter kernel", "ms", False, "p50 <= 2 ms, < 1x ceiling"),
    ("first_gateway", "execute->first output vs Jupyter kernel gateway", "ms", False, "< 1x ceiling"),
    ("first_bwrap_cold", "execute->first output, bwrap, cold", "ms", False, "- (reported)"),
    *backtoback.ROW_SPECS,
    ("first_none", "execute->first output, none", "ms", False, "p50 <= 5 ms"),
    ("echo", "echo round trip, whole chain", "ms", False, "p50 <= 1 ms"),
    ("big_live", "stream 64 KiB frames, live", "MB/s", True, ">= 70% of ceiling"),
    ("big_replay", "stream 64 KiB frames, replay", "MB/s", True, ">= live"),
    ("small_live", "stream 100 B frames, live", "frames/s", True, ">= 150k/s"),
    ("small_replay", "stream 100 B frames, replay", "frames/s", True, ">= live"),
    ("reattach", "reattach: connect+attach->1st frame", "ms", False, "- (reported)"),
    ("node_big", "64 KiB frames to a Node ws+cbor-x client", "MB/s", True, ">= 500 MB/s, >= 70% of ceiling"),
    ("node_small", "100 B frames to a Node ws+cbor-x client", "frames/s", True, ">= 250k/s"),
    ("pkgs_new", "execute->first output, new packages spec", "ms", False, "- (reported)"),
    ("pkgs_cached", "execute->first output, cached packages", "ms", False, "<= 1.1x ceiling"),
    ("sessions_errors", "N concurrent sessions: errors", "count", False, "= 0"),
    ("sessions_rate", "N sessions: execute rate (start)", "sess/s", True, "- (reported)"),
    ("server_per_session", "server RSS per idle session", "KiB", False, "<= 50 KiB"),
    ("exchange_rss", "exchange RSS per session", "MiB", False, "<= 8 MiB"),
    ("exchange_pss", "exchange PSS per session", "MiB", False, "- (reported)"),
    ("env_rss", "environment RSS (sandbox + driver)", "MiB", False, "- (reported)"),
    ("env_pss", "environment PSS (sandbox + driver)", "MiB", False, "- (reported)"),
    ("loaded_echo", "echo round trip, N sessions running", "ms", False, "p50 <= 1 ms"),
    ("ended_server", "server RSS per ended, unread session", "KiB", False, "<= 50 KiB"),
    ("ended_processes", "processes left for N ended sessions", "count", False, "= 0"),
    ("backlog_rss", "server RSS growth, unread backlog", "MiB", False, "<= 20 MiB"),
    *multinode.ROW_SPECS,
]
ROW_NAMES = [spec[1] for spec in ROW_SPECS]


class Bench:
    def __init__(self, budget: Budget, tmp: str) -> None:
        self.b = budget
        self.tmp = tmp
        self.t0 = time.monotonic()
        self.rows = {k: Row(k, name, unit, higher_is_better=hib, target=target)
                     for k, name, unit, hib, target in ROW_SPECS}
        self.ceil: dict[str, Sample] = {}
        self.ceil_names: dict[str, str] = {}
        self.servers: list[ServerProcess] = []
        self.n_servers = 0
        self.bare: ceilings.BareServer | None = None
        self.failed = False
        self.unsettled = 0  # measurements started on a machine that stayed busy
        self.extra: dict[str, Any] = {}

    # -- plumbing -----------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def quiet(self) -> None:
        """Start the next measurement on a quiet machine (common.settle); say so
        when the machine did not quieten (the figure then carries its load).
        The smoke mode checks that the bench runs, not its figures: no wait."""
        if self.b.mode == "smoke":
            return
        if not settle():
            self.unsettled += 1
            self.log("    (the machine stayed busy for 3 s; measuring anyway)")

    def stage(self, name: str, keys: list[str], fn: Callable[[], None]) -> None:
        self.log(f"{name} ...")
        try:
            self.quiet()
            fn()
        except BaseException as exc:  # noqa: BLE001 - a failed stage marks its rows, the rest goes on
            if _interrupted(exc):
                raise KeyboardInterrupt from exc
            self.failed = True
            msg = _describe(exc)
            self.log(f"{name} FAILED: {msg}")
            traceback.print_exc(file=sys.stderr)
            for srv in self.servers:
                self.show_logs(srv)
            for k in keys:
                if self.rows[k].p50 is None:
                    self.rows[k].error = msg

    def server(self, sandbox: str, *extra: str) -> ServerProcess:
        self.n_servers += 1
        d = os.path.join(self.tmp, f"srv{self.n_servers}")
        os.makedirs(d)
        # The 1,000-session row runs more functions at once than admission's
        # defaults admit (each default limit of 1 GiB counts against the memory
        # budget, though an idle one uses a few MiB), so every server gets room.
        srv = ServerProcess(os.path.join(d, "data"), "--sandbox", sandbox,
                            "--max-buffer-bytes", MAX_BUFFER, *CAPACITY, *extra)
        self.servers.append(srv)
        srv.start()
        return srv

    @contextlib.contextmanager
    def running(self, sandbox: str, *extra: str) -> Iterator[ServerProcess]:
        """A server for one stage; its logs are shown if the stage fails."""
        srv = self.server(sandbox, *extra)
        try:
            yield srv
        except BaseException as exc:
            if not _interrupted(exc):
                self.show_logs(srv)
            raise
        finally:
            self.stop(srv)

    def show_logs(self, srv: ServerProcess, lines: int = 15) -> None:
        paths = [srv.log_path]
        sessions = os.path.join(srv.data_dir, "sessions")
        if os.path.isdir(sessions):
            paths += [os.path.join(sessions, s, "exchange.log") for s in sorted(os.listdir(sessions))[:3]]
        for path in paths:
            try:
                with open(path, errors="replace") as f:
                    tail = f.read().splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                print(f"--- {path} (last {len(tail)} lines)", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr, flush=True)

    def stop(self, srv: ServerProcess) -> None:
        try:
            srv.stop()
        except Exception:  # noqa: BLE001 - still make sure it is gone
            if srv.proc is not None and srv.proc.poll() is None:
                srv.proc.kill()
                srv.proc.wait()
        if srv in self.servers:
            self.servers.remove(srv)
        shutil.rmtree(os.path.dirname(srv.data_dir), ignore_errors=True)

    def stop_all(self) -> None:
        for srv in list(self.servers):
            self.stop(srv)
        if self.bare is not None:
            self.bare.stop()
            self.bare = None

    def bare_url(self) -> str:
        if self.bare is None:
            raise RuntimeError("the bare trio-websocket server (the ceiling) is not running")
        return self.bare.url

    def set_ceiling(self, key: str, name: str, values: list[float], higher_is_better: bool = False) -> None:
        self.ceil[key] = Sample(values, higher_is_better)
        self.ceil_names[key] = name

    def use_ceiling(self, row: str, key: str) -> None:
        if key in self.ceil:
            self.rows[row].ceiling = self.ceil[key].p50
            self.rows[row].ceiling_name = f"{self.ceil_names[key]} = {_fmt_ceiling(self.ceil[key], self.rows[row].unit)}"

    # -- stages -------------------------------------------------------------------

    def stage_spawn(self) -> None:
        runs = self.b.spawn_runs
        py = [s * MS for s in ceilings.spawn_samples(ceilings.bare_python_argv(), runs)]
        self.set_ceiling("spawn_python", "bare `python -I -S` start, first byte (ms)", py)
        self.log(f"    python -I -S first byte p50 {statistics.median(py):.1f} ms")
        home = tempfile.mkdtemp(prefix="bwrap-home-", dir=self.tmp)
        home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bw = [s * MS for s in ceilings.spawn_samples(ceilings.bwrap_argv(home_fd), runs, fds=(home_fd,))]
        finally:
            os.close(home_fd)
        self.set_ceiling("spawn_bwrap", "same inside the server's bwrap argv (ms)", bw)
        self.log(f"    in bwrap first byte p50 {statistics.median(bw):.1f} ms")
        # An idle bare interpreter: what one Python process costs at least.
        proc = subprocess.Popen([ceilings.real_python(), "-I", "-S", "-c", "import sys; sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            m = psutil.Process(proc.pid).memory_full_info()
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
        self.set_ceiling("idle_rss", "idle bare `python -I -S` RSS (MiB)", [m.rss / MiB])
        self.set_ceiling("idle_pss", "idle bare `python -I -S` PSS (MiB)", [m.pss / MiB])

    def stage_bare_ws(self) -> None:
        """Start the bare server. Its figures are taken next to the chain figure
        they are the ceiling of (interleaved run by run for the streams), so a
        change in the machine's background load hits both alike."""
        self.bare = ceilings.BareServer().start()
        rtt = trio.run(ceilings.ws_rtt, self.bare.url, 200)
        self.log(f"    bare ws up; round trip p50 {statistics.median(rtt) * MS:.3f} ms")

    def stage_bwrap_chain(self) -> None:
        b = self.b
        with self.running("bwrap") as srv:
            url = srv.url

            def go(key: str, what: str, fn: Callable[[], None]) -> None:
                self.stage(f"  {what}", [key], fn)

            def first() -> None:
                xs = [x * MS for x in trio.run(chain.first_output, url, b.first_output_runs, 2,
                                               b.first_output_pause)]
                self.rows["first_bwrap"].set(xs)
                self.quiet()  # the warm pool refills after the last execute
                idle = [x * MS for x in trio.run(ceilings.ws_rtt, self.bare_url(),
                                                 b.first_output_runs, 2, b.first_output_pause)]
                self.rows["first_bwrap"].note = (
                    f"default warm pool; one execute every ~{b.first_output_pause * MS:.0f} ms + its "
                    f"run time; a bare ws round trip after the same idle pause: p50 "
                    f"{statistics.median(idle):.2f} ms (the path has six process hops)")
                self.log(f"    warm first output p50 {statistics.median(xs):.1f} ms")

            def echo() -> None:
                rtt = [x * MS for x in trio.run(ceilings.ws_rtt, self.bare_url(), b.echo_rtts)]
                self.set_ceiling("ws_rtt", "bare trio-websocket+CBOR round trip (ms)", rtt)
                self.quiet()
                xs = [x * MS for x in trio.run(chain.echo_rtts, url, b.echo_rtts)]
                self.rows["echo"].set(xs)
                self.log(f"    echo p50 {statistics.median(xs):.2f} ms (bare ws {statistics.median(rtt):.3f} ms)")

            def streams(kind: str, live_key: str, replay_key: str, amount: int, scale: float) -> None:
                live, replay, ceil = [], [], []
                assert srv.proc is not None
                probes: dict[str, list[dict[str, float]]] = {"live": [], "replay": []}
                for run in range(b.stream_runs):
                    # Each measurement starts on a quiet machine (the stage's start is).
                    if run:
                        self.quiet()
                    if kind == "big":
                        ceil.append(trio.run(ceilings.ws_stream, self.bare_url(), chain.FRAME,
                                             amount // chain.FRAME) / scale)
                    else:
                        ceil.append(trio.run(ceilings.ws_records, self.bare_url(), 100, 64, amount) / scale)
                    self.quiet()
                    p_live = chain.CpuProbe(srv.proc.pid, srv.data_dir, amount)
                    live.append(trio.run(chain.stream_live, url, kind, amount, p_live) / scale)
                    self.quiet()
                    p_replay = chain.CpuProbe(srv.proc.pid, srv.data_dir, amount)
                    replay.append(trio.run(chain.stream_replay, url, kind, amount, p_replay) / scale)
                    for what, p in (("live", p_live), ("replay", p_replay)):
                        if p.shares:
                            probes[what].append(p.shares)
                if kind == "big":
                    self.set_ceiling("ws_big", "bare ws, one 64 KiB out event per message (MB/s)", ceil, True)
                else:
                    self.set_ceiling("ws_small", "bare ws, 100 B records x64 per message (frames/s)", ceil, True)
                self.rows[live_key].set(live)
                self.rows[replay_key].set(replay)
                for what, key in (("live", live_key), ("replay", replay_key)):
                    if probes[what]:
                        roles = [r for r in ("client", "server", "exchange", "environment")
                                 if all(r in p for p in probes[what])]
                        med = {r: statistics.median(p[r] for p in probes[what]) for r in roles}
                        self.rows[key].cpu = med
                        self.rows[key].note = "CPU (cores, mid-run median): " + ", ".join(
                            f"{r} {v:.2f}" for r, v in med.items())
                self.log(f"    {kind}: live p50 {statistics.median(live):,.1f}, replay p50 "
                         f"{statistics.median(replay):,.1f}, bare ws {statistics.median(ceil):,.1f} "
                         f"{self.rows[live_key].unit}")

            def reattach() -> None:
                conn = [x * MS for x in trio.run(ceilings.ws_connect_rtt, self.bare_url(), b.reattach_runs)]
                self.set_ceiling("ws_connect", "bare ws connect + one round trip (ms)", conn)
                self.quiet()
                xs = [x * MS for x in trio.run(chain.reattach, url, b.reattach_runs)]
                self.rows["reattach"].set(xs)
                self.log(f"    reattach p50 {statistics.median(xs):.2f} ms")

            go("first_bwrap", "first output (bwrap)", first)
            self.stage("  first output vs warm Jupyter", ["first_jupyter", "first_gateway"],
                       lambda: self.against_jupyter(url))
            go("echo", "echo", echo)
            self.stage("  stream 64 KiB", ["big_live", "big_replay"],
                       lambda: streams("big", "big_live", "big_replay", b.stream_bytes, 1e6))
            self.stage("  stream 100 B", ["small_live", "small_replay"],
                       lambda: streams("small", "small_live", "small_replay", b.small_frames, 1.0))
            go("reattach", "reattach", reattach)
            self.stage("  independent client (Node ws + cbor-x)", ["node_big", "node_small"],
                       lambda: self.node_streams(url))

    def against_jupyter(self, url: str) -> None:
        """The issue's comparison: the warm first output against a warm Jupyter
        kernel (stock jupyter_client over ZMQ: no sandbox, nothing kept) and the
        same kernel behind the Jupyter kernel gateway (a stock WebSocket
        client), each ``print('x')``, interleaved execute by execute."""
        why = jupyter_ceiling.missing()
        if why is not None:
            for key in ("first_jupyter", "first_gateway"):
                self.rows[key].error = why
            self.log(f"    skipped: {why}")
            return
        b = self.b
        others: list[jupyter_ceiling.Jupyter] = []
        try:
            for mode in ("kernel", "gateway"):
                others.append(jupyter_ceiling.Jupyter(mode))
            self.quiet()
            ours, (kernel, gateway) = trio.run(chain.first_output_against, url, others, 2 * b.first_output_runs,
                                               b.first_output_pause)
        finally:
            for o in others:
                o.close()
        ours = [x * MS for x in ours]
        for key, name, theirs in (("first_jupyter", "warm Jupyter kernel, jupyter_client over ZMQ (ms)", kernel),
                                  ("first_gateway", "warm Jupyter kernel gateway, websocket-client (ms)", gateway)):
            self.set_ceiling(key, name, [x * MS for x in theirs])
            self.rows[key].set(ours)
        self.rows["first_jupyter"].note = ("interleaved with the kernel and the gateway, one execute of print('x') "
                                           f"each every ~{b.first_output_pause * MS:.0f} ms")
        self.log(f"    first output p50 {statistics.median(ours):.2f} ms; Jupyter kernel "
                 f"{statistics.median(kernel) * MS:.2f} ms, kernel gateway {statistics.median(gateway) * MS:.2f} ms")

    def node_streams(self, url: str) -> None:
        """The issue's independent client: stock `ws` + `cbor-x`, acking each
        event, against the server and against the bare server (its ceiling: the
        same client, the same bytes), interleaved run by run."""
        why = node_client.missing()
        if why is not None:
            for key in ("node_big", "node_small"):
                self.rows[key].error = why
            self.log(f"    skipped: {why}")
            return
        b = self.b
        for kind, key, amount, scale in (("big", "node_big", b.stream_bytes, 1e6),
                                         ("small", "node_small", b.small_frames, 1.0)):
            figures, ceil = [], []
            for run in range(b.stream_runs):
                if run:
                    self.quiet()
                ceil.append(node_client.stream("bare", self.bare_url(), kind, amount) / scale)
                self.quiet()
                figures.append(node_client.stream("bento", url, kind, amount) / scale)
            self.set_ceiling(f"node_{kind}", f"the same Node client from the bare ws server ({self.rows[key].unit})",
                             ceil, True)
            self.rows[key].set(figures)
            self.log(f"    Node client {kind}: p50 {statistics.median(figures):,.1f}, "
                     f"from the bare server {statistics.median(ceil):,.1f} {self.rows[key].unit}")

    def stage_cold(self) -> None:
        """Cold: no sandbox started ahead of time. With a server that has a warm
        pool option, the pool is turned off and every execute is cold; otherwise
        the first execute after each server start is the cold one."""
        from bento.app import server_parser

        row = self.rows["first_bwrap_cold"]
        if any("--pool" in a.option_strings for a in server_parser()._actions):
            with self.running("bwrap", "--pool", "0") as srv:
                xs = [x * MS for x in trio.run(chain.first_output, srv.url, self.b.cold_runs, 1,
                                               self.b.first_output_pause)]
            row.note = "bwrap with --pool 0: a sandbox started for each execute"
        else:
            xs = []
            for _ in range(self.b.cold_runs):
                with self.running("bwrap") as srv:
                    xs.append(trio.run(chain.cold_first_output, srv.url) * MS)
            row.note = "first execute after a server start (one per start)"
        row.set(xs)
        self.log(f"    cold first output p50 {statistics.median(xs):.1f} ms")

    def stage_none(self) -> None:
        with self.running("none") as srv:
            xs = [x * MS for x in trio.run(chain.first_output, srv.url, self.b.first_output_runs, 2,
                                           self.b.first_output_pause)]
            self.rows["first_none"].set(xs)
            self.log(f"    none first output p50 {statistics.median(xs):.1f} ms")

    def stage_packages(self) -> None:
        # A package from the index (the first build needs it; uv's own cache may
        # hold its wheel, as on any machine that built it once).
        with self.running("bwrap") as srv:
            new, cached, plain = trio.run(chain.packages_first_output, srv.url, list(PACKAGES),
                                          self.b.first_output_runs, self.b.first_output_pause)
        self.rows["pkgs_new"].set([new * MS])
        self.rows["pkgs_cached"].set([x * MS for x in cached])
        self.set_ceiling("plain_first", "the same without packages, interleaved (ms)", [x * MS for x in plain])
        self.log(f"    new spec {new * MS:.0f} ms; cached p50 {statistics.median(cached) * MS:.1f} ms, "
                 f"without packages p50 {statistics.median(plain) * MS:.1f} ms")

    def stage_sessions(self) -> None:
        n = self.b.sessions
        # Do not take the machine down: ~16 MiB per session (exchange + environment).
        fits = int(chain.available_memory() * 0.8 / (16 * MiB))
        if fits < n:
            self.rows["sessions_errors"].note = f"only {fits} of {n} sessions fit in available memory"
            self.log(f"    only {fits} sessions fit in memory; running {fits}")
            n = fits
        self.extra["sessions"] = n
        with self.running("bwrap") as srv:
            assert srv.proc is not None
            pid = srv.proc.pid
            res = trio.run(lambda: chain.many_sessions(
                srv.url, pid, srv.data_dir, n, self.b.memory_sample, self.b.loaded_echo_rtts,
                log=self.log))
        r = self.rows
        r["sessions_errors"].set(float(res["errors"] + (self.b.sessions - n)))
        if res["error_kinds"]:
            r["sessions_errors"].note = (r["sessions_errors"].note + " " + ", ".join(
                f"{k}: {v}" for k, v in res["error_kinds"].items())).strip()
        r["sessions_rate"].set(res["start_rate"])
        r["sessions_rate"].note = (f"{res['running']} of {n} running after {res['start_s']:.1f} s of "
                                   f"executes; destroyed in {res['destroy_s']:.1f} s")
        if res["states_server"] != res["states_exchange"]:
            r["sessions_errors"].note = (r["sessions_errors"].note + " the server's list disagrees with the "
                                         f"exchanges: {res['states_server']} vs {res['states_exchange']}").strip()
        r["server_per_session"].set(res["server_per_session"] / 1024)
        r["server_per_session"].note = (f"server RSS {res['server_rss_base'] / MiB:.1f} -> "
                                        f"{res['server_rss_after'] / MiB:.1f} MiB with {n} sessions")
        for key, vals in (("exchange_rss", res["ex_rss"]), ("exchange_pss", res["ex_pss"]),
                          ("env_rss", res["env_rss"]), ("env_pss", res["env_pss"])):
            if vals:
                r[key].set([v / MiB for v in vals])
            else:
                r[key].error = "no process found to measure"
        if res["echo"]:
            r["loaded_echo"].set([x * MS for x in res["echo"]])
        else:
            r["loaded_echo"].error = "echo under load failed"

    def stage_ended(self) -> None:
        """Sessions that ended with nobody reading: they cost no process, and the
        server holds little for each (their output is on disk)."""
        n = self.b.sessions
        with self.running("bwrap") as srv:
            assert srv.proc is not None
            res = trio.run(lambda: chain.ended_sessions(srv.url, srv.proc.pid, srv.data_dir, n, log=self.log))
        r = self.rows
        if res["errors"]:
            raise RuntimeError("ended sessions: " + ", ".join(f"{k}: {v}" for k, v in res["error_kinds"].items()))
        r["ended_server"].set(res["server_per_session"] / 1024)
        r["ended_server"].note = (f"server RSS {res['server_rss_base'] / MiB:.1f} -> "
                                  f"{res['server_rss_after'] / MiB:.1f} MiB with {res['n']} ended sessions")
        r["ended_processes"].set(float(res["processes"]))
        if res["processes"]:
            r["ended_processes"].note = f"their RSS: {res['processes_rss'] / MiB:.1f} MiB"

    def stage_backlog(self) -> None:
        with self.running("bwrap") as srv:
            assert srv.proc is not None
            pid = srv.proc.pid
            res = trio.run(lambda: chain.backlog(srv.url, pid, self.b.backlog_bytes, log=self.log))
        row = self.rows["backlog_rss"]
        row.set(max(0, res["peak"] - res["base"]) / MiB)
        row.note = (f"peak while {res['buffered'] / MiB:.0f} MiB were buffered unread "
                    f"(written in {res['write_s']:.1f} s); {res['base'] / MiB:.1f} -> {res['peak'] / MiB:.1f} MiB, "
                    f"{res['end'] / MiB:.1f} MiB at the end")

    # -- the table ------------------------------------------------------------------

    def finish(self) -> list[Row]:
        r = self.rows
        self.use_ceiling("first_bwrap", "spawn_bwrap")
        self.use_ceiling("first_bwrap_cold", "spawn_bwrap")
        self.use_ceiling("first_jupyter", "first_jupyter")
        self.use_ceiling("first_gateway", "first_gateway")
        self.use_ceiling("first_none", "spawn_python")
        self.use_ceiling("echo", "ws_rtt")
        self.use_ceiling("loaded_echo", "ws_rtt")
        self.use_ceiling("big_live", "ws_big")
        self.use_ceiling("big_replay", "ws_big")
        self.use_ceiling("small_live", "ws_small")
        self.use_ceiling("small_replay", "ws_small")
        self.use_ceiling("reattach", "ws_connect")
        self.use_ceiling("node_big", "node_big")
        self.use_ceiling("node_small", "node_small")
        self.use_ceiling("pkgs_cached", "plain_first")
        self.use_ceiling("exchange_rss", "idle_rss")
        self.use_ceiling("exchange_pss", "idle_pss")
        self.use_ceiling("env_rss", "idle_rss")
        self.use_ceiling("env_pss", "idle_pss")
        multinode.set_ceilings(self)
        backtoback.set_ceilings(self)

        r["first_bwrap"].judge(lambda x: x <= 5)
        r["first_none"].judge(lambda x: x <= 5)
        r["first_jupyter"].judge(lambda x: x <= 2 and r["first_jupyter"].ratio is not None
                                 and r["first_jupyter"].ratio < 1)
        r["first_gateway"].judge(lambda x: r["first_gateway"].ratio is not None and r["first_gateway"].ratio < 1)
        r["echo"].judge(lambda x: x <= 1)
        r["loaded_echo"].judge(lambda x: x <= 1)
        r["big_live"].judge(lambda x: r["big_live"].ratio is not None and r["big_live"].ratio >= 0.7)
        for live, replay in (("big_live", "big_replay"), ("small_live", "small_replay")):
            lv = r[live].p50
            if lv is not None:
                r[replay].judge(lambda x, lv=lv: x >= lv)
        r["small_live"].judge(lambda x: x >= 150_000)
        r["node_big"].judge(lambda x: x >= 500 and r["node_big"].ratio is not None and r["node_big"].ratio >= 0.7)
        r["node_small"].judge(lambda x: x >= 250_000)
        r["pkgs_cached"].judge(lambda x: r["pkgs_cached"].ratio is not None and r["pkgs_cached"].ratio <= 1.1)
        r["sessions_errors"].judge(lambda x: x == 0)
        r["server_per_session"].judge(lambda x: x <= 50)
        r["ended_server"].judge(lambda x: x <= 50)
        r["ended_processes"].judge(lambda x: x == 0)
        r["exchange_rss"].judge(lambda x: x <= 8)
        r["backlog_rss"].judge(lambda x: x <= 20)
        n = self.extra.get("sessions", self.b.sessions)
        for k in ("sessions_errors", "sessions_rate", "loaded_echo", "ended_processes"):
            r[k].name = r[k].name.replace("N ", f"{n:,} ", 1)
        vol = self.b.backlog_bytes
        r["backlog_rss"].name += f" {vol // MiB} MiB" if vol < 1024 * MiB else f" {vol // (1024 * MiB)} GiB"
        return list(r.values())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        leaves = []

        def walk(e: BaseException) -> None:
            if isinstance(e, BaseExceptionGroup):
                for sub in e.exceptions:
                    walk(sub)
            else:
                leaves.append(e)

        walk(exc)
        return "; ".join(_describe(e) for e in leaves[:3])
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _fmt_ceiling(s: Sample, unit: str) -> str:
    from common import fmt_num

    tail = f", p90 {fmt_num(s.p90)}" if len(s.values) > 1 else ""
    return f"{fmt_num(s.p50)}{tail} (n={len(s.values)})"


def _sigterm(_signum: int, _frame: Any) -> None:
    # Turn SIGTERM into SIGINT: trio delivers that one as KeyboardInterrupt at
    # a safe point, and outside trio the default handler raises it at once.
    signal.raise_signal(signal.SIGINT)


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, possibly inside an exception group or as a cause."""
    seen = 0
    stack = [exc]
    while stack and seen < 100:
        e = stack.pop()
        seen += 1
        if isinstance(e, KeyboardInterrupt):
            return True
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                stack.append(nxt)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the one-minute version (same rows)")
    ap.add_argument("--smoke", action="store_true", help="with --quick: tiny volumes, ~30 s (for the smoke test)")
    ap.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    ap.add_argument("--sessions", type=int, help="override the number of concurrent sessions")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    budget = BUDGETS[mode]
    if args.sessions:
        budget.sessions = args.sessions
    # Ctrl-C and SIGTERM both stop the run cleanly (also when started in the
    # background, where SIGINT would otherwise be ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)

    # Every process the bench starts imports compiled code: a module edited since
    # its .pyc was written is compiled again at each import when the environment
    # says PYTHONDONTWRITEBYTECODE, which made every exchange start slower.
    for pkg in ("bento", "driver", "sandbox", "clients"):
        compileall.compile_dir(os.path.join(ROOT, pkg), quiet=1)
    info = machine_info()
    tmp = tempfile.mkdtemp(prefix="bento-bench-")
    bench = Bench(budget, tmp)
    interrupted = False
    bench.log(f"mode {mode}; scratch {tmp}")
    try:
        bench.stage("ceilings: process start", [], bench.stage_spawn)
        bench.stage("ceilings: bare trio-websocket", [], bench.stage_bare_ws)
        bench.stage("chain, --sandbox bwrap", ["first_bwrap", "echo", "big_live", "big_replay", "small_live",
                                               "small_replay", "reattach"], bench.stage_bwrap_chain)
        bench.stage("back-to-back executes, --sandbox bwrap", backtoback.KEYS, lambda: backtoback.stage(bench))
        bench.stage("chain, --sandbox none", ["first_none"], bench.stage_none)
        bench.stage("cold starts", ["first_bwrap_cold"], bench.stage_cold)
        bench.stage("packages", ["pkgs_new", "pkgs_cached"], bench.stage_packages)
        bench.stage(f"{budget.sessions} concurrent sessions",
                    ["sessions_errors", "sessions_rate", "server_per_session", "exchange_rss", "exchange_pss",
                     "env_rss", "env_pss", "loaded_echo"], bench.stage_sessions)
        bench.stage(f"{budget.sessions} ended sessions", ["ended_server", "ended_processes"], bench.stage_ended)
        bench.stage("unread backlog", ["backlog_rss"], bench.stage_backlog)
        bench.stage("cluster: two nodes on one redis-server", multinode.KEYS, lambda: multinode.stage(bench))
    except KeyboardInterrupt:
        interrupted = True
        bench.log("interrupted: stopping everything")
    finally:
        # Clean-up is bounded (each server gets seconds to stop); let it finish.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - bench.t0
    info["loadavg_end"] = os.getloadavg()
    rows = bench.finish()
    for row in rows:
        if row.p50 is None and row.error is None:
            row.error = "not measured" + (" (interrupted)" if interrupted else "")
            bench.failed = True

    b = budget
    out = [
        machine_text(info, mode),
        f"volumes: {b.stream_runs} runs x {b.stream_bytes // MiB} MiB of 64 KiB frames and "
        f"{b.stream_runs} x {b.small_frames:,} frames of 100 B (each live and replayed); "
        f"{bench.extra.get('sessions', b.sessions):,} sessions; backlog {b.backlog_bytes // MiB} MiB; "
        f"run took {elapsed:.0f} s; measurements started on a machine still busy after 3 s: "
        f"{bench.unsettled}",
        "",
        table(rows),
        LEGEND,
        footnotes(rows),
    ]
    print("\n".join(out), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "machine": info, "elapsed_s": elapsed, "unsettled": bench.unsettled,
                       "budget": b.__dict__, "rows": [row.to_json() for row in rows],
                       "ceilings": {k: {"name": bench.ceil_names[k], "values": s.values, "p50": s.p50,
                                        "p90": s.p90} for k, s in bench.ceil.items()}},
                      f, indent=2)
    if interrupted:
        return 130
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
