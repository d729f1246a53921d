"""Cluster-mode figures: two ``bento server --cluster`` nodes on one local
``redis-server``; the function runs on node A and the client reads through
node B, so every frame goes node A -> Redis -> node B -> client.

The embedded store's figures of the same run (the bwrap chain's rows) are the
ceilings. Redis's own counters (INFO stats) give the commands and bytes per
output frame; they include the nodes' background traffic (heartbeats, each
idle reader's XREAD BLOCK), which is small next to a stream's.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from typing import Any

import chain
import trio
from client import StreamCount, next_message, now, open_client, read_stream, request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MS = 1000.0

# key, name, unit, higher_is_better, target
ROW_SPECS: list[tuple[str, str, str, bool, str]] = [
    ("cl_first", "cluster: execute->first output", "ms", False, "- (reported)"),
    ("cl_attach", "cluster: attach on other node->1st frame", "ms", False, "- (reported)"),
    ("cl_big", "cluster: 64 KiB frames via other node", "MB/s", True, "- (reported)"),
    ("cl_small", "cluster: 100 B frames via other node", "frames/s", True, "- (reported)"),
    ("cl_ops_small", "cluster: Redis commands/frame, 100 B", "cmd", False, "- (reported)"),
    ("cl_bytes_small", "cluster: Redis bytes/frame, 100 B", "B", False, "- (reported)"),
    ("cl_ops_big", "cluster: Redis commands/frame, 64 KiB", "cmd", False, "- (reported)"),
    ("cl_bytes_big", "cluster: Redis bytes/frame, 64 KiB", "B", False, "- (reported)"),
    ("cl_cpu_small", "cluster: Redis CPU/frame, 100 B", "us", False, "- (reported)"),
    ("cl_cpu_big", "cluster: Redis CPU/frame, 64 KiB", "us", False, "- (reported)"),
]
KEYS = [spec[0] for spec in ROW_SPECS]
# cluster row -> the embedded row of the same run that is its ceiling
CEILINGS = {"cl_first": "first_bwrap", "cl_attach": "reattach", "cl_big": "big_live", "cl_small": "small_live"}


def redis_process(workdir: str) -> Any:
    """A redis-server on a free loopback port (no persistence), as the tests start it."""
    path = os.path.join(ROOT, "tests", "cluster", "conftest.py")
    spec = importlib.util.spec_from_file_location("bento_bench_cluster_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisProcess(workdir)


async def redis_counters(port: int) -> dict[str, float]:
    """Commands, bytes in and out, and CPU seconds (user + system) of the Redis server so far."""
    from bento.cluster import connect

    redis = connect.client(f"redis://127.0.0.1:{port}/0")
    async with redis:
        stats = await redis.info("stats")
        cpu = await redis.info("cpu")
    out = {k: float(stats[k]) for k in ("total_commands_processed", "total_net_input_bytes",
                                        "total_net_output_bytes")}
    out["cpu_s"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return out


async def attach_on_other(run_url: str, read_url: str, runs: int, warmup: int = 2) -> list[float]:
    """Execute on the running node; then, ``runs`` times: connect to the other
    node (WebSocket + hello) and attach from seq 1 -> first frame."""
    out = []
    async with open_client(run_url) as c:
        r = await request(c, "execute", code=chain.CODE_FEW, attach=False)
        try:
            await chain.wait_ended(c, r["token"], timeout=30)
            for i in range(warmup + runs):
                t0 = now()
                async with open_client(read_url) as c2:
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
                await chain.destroy(c, r["token"])
    return out


async def stream_via_other(run_url: str, read_url: str, redis_port: int, kind: str,
                           amount: int) -> tuple[float, int, dict[str, float]]:
    """Execute on the running node (not attached) and read it live through the
    other node from seq 1, acking as it goes: (rate, frames, Redis counters'
    growth over the run)."""
    if kind == "big":
        code, arg, unit, frames = chain.CODE_BIG, amount // chain.FRAME, "bytes", amount // chain.FRAME
        buffer = {"max_bytes": 16 * 1024 * 1024, "policy": "block"}
    else:
        code, arg, unit, frames = chain.CODE_SMALL, amount, "frames", amount
        buffer = {"max_bytes": 64 * 1024 * 1024, "policy": "block"}
    expect = frames * chain.FRAME if kind == "big" else frames
    before = await redis_counters(redis_port)
    async with open_client(run_url) as c, open_client(read_url) as reader:
        r = await request(c, "execute", code=code, args=[arg], attach=False, buffer=buffer)
        try:
            await request(reader, "attach", token=r["token"], **{"from": 1})
            with trio.fail_after(180):
                counter = await read_stream(reader, r["session"], StreamCount(unit), ack=True)
            after = await redis_counters(redis_port)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await chain.destroy(c, r["token"])
    chain._check(counter, expect, f"{kind} via the other node")
    growth = {k: after[k] - before[k] for k in after}
    return counter.rate(), frames + 1, growth  # + 1: the exit frame


def stage(bench: Any) -> None:
    """The cluster rows (``bench`` is run.Bench)."""
    b = bench.b
    workdir = os.path.join(bench.tmp, "redis")
    os.makedirs(workdir)
    redis = redis_process(workdir).start()
    try:
        with bench.running("bwrap", "--cluster", redis.url, "--node", "a") as a, \
                bench.running("bwrap", "--cluster", redis.url, "--node", "b") as node_b:
            rows = bench.rows
            xs = [x * MS for x in trio.run(chain.first_output, a.url, b.first_output_runs, 2,
                                           b.first_output_pause)]
            rows["cl_first"].set(xs)
            bench.log(f"    cluster first output p50 {statistics.median(xs):.1f} ms")
            bench.quiet()
            xs = [x * MS for x in trio.run(attach_on_other, a.url, node_b.url, b.reattach_runs)]
            rows["cl_attach"].set(xs)
            bench.log(f"    attach on the other node p50 {statistics.median(xs):.2f} ms")
            for kind, amount, scale in (("big", max(chain.FRAME * 16, b.stream_bytes // 4), 1e6),
                                        ("small", max(1000, b.small_frames // 2), 1.0)):
                rates, per_cmd, per_byte, ins, outs, cpu = [], [], [], [], [], []
                for _ in range(min(3, b.stream_runs)):
                    bench.quiet()
                    rate, frames, growth = trio.run(stream_via_other, a.url, node_b.url, redis.port, kind,
                                                    amount)
                    rates.append(rate / scale)
                    per_cmd.append(growth["total_commands_processed"] / frames)
                    ins.append(growth["total_net_input_bytes"] / frames)
                    outs.append(growth["total_net_output_bytes"] / frames)
                    per_byte.append(ins[-1] + outs[-1])
                    cpu.append(growth["cpu_s"] / frames * 1e6)
                size = "64 KiB" if kind == "big" else "100 B"
                rows[f"cl_{kind}"].set(rates)
                rows[f"cl_ops_{kind}"].set(per_cmd)
                rows[f"cl_bytes_{kind}"].set(per_byte)
                rows[f"cl_cpu_{kind}"].set(cpu)
                rows[f"cl_cpu_{kind}"].note = (
                    f"{size} frames: redis-server's own CPU (user + system) over the run per frame; one "
                    f"Redis core carries about {1e6 / max(statistics.median(cpu), 1e-9):,.0f} such frames/s")
                rows[f"cl_bytes_{kind}"].note = (
                    f"{size} frames: into Redis {statistics.median(ins):,.0f} B/frame (node A's mirror, "
                    f"node B's reads and acks), out of Redis {statistics.median(outs):,.0f} B/frame "
                    "(node B's reads); the embedded store: 0")
                rows[f"cl_ops_{kind}"].note = "the embedded store: 0 (no Redis)"
                bench.log(f"    {kind} via the other node p50 {statistics.median(rates):,.1f} "
                          f"{rows[f'cl_{kind}'].unit}; {statistics.median(per_cmd):.3f} commands and "
                          f"{statistics.median(per_byte):,.0f} bytes and {statistics.median(cpu):.1f} us of "
                          "Redis CPU per frame")
    finally:
        redis.stop()


def set_ceilings(bench: Any) -> None:
    """Each cluster row's ceiling: the embedded store's row of the same run."""
    for key, embedded in CEILINGS.items():
        ref = bench.rows[embedded]
        if ref.p50 is not None:
            bench.rows[key].ceiling = ref.p50
            bench.rows[key].ceiling_name = f"embedded store, same run: {ref.name} = {ref.p50:,.2f} {ref.unit}"
