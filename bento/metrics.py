"""The server's figures for ``GET /metrics``, in Prometheus text format (prometheus-client).

What the server holds anyway (sessions, attachments, buffers, the warm pool,
connections, bytes moved) is read from the live objects at scrape time by
``StateCollector``; what happens once (an execute, a batch of frames sent, an
error answered) is counted where it happens by one call on ``Metrics``. Each
server has its own CollectorRegistry, never prometheus-client's global one.

The metric names and what each means are listed in docs/operations.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bento import protocol
from bento.admission import key_id
from bento.session_core import State

if TYPE_CHECKING:
    from bento.server import Server
    from bento.sessions import Session

MODES = ("rw", "ro")
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How long an execute's start is watched for the latency histogram.
START_WATCH_S = 120.0


class Metrics:
    """The counters and the histogram, and the text of all figures."""

    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.executes = Counter("bento_executes", "Executes answered with a session", registry=r)
        self.start_seconds = Histogram(
            "bento_execute_start_seconds", "Time from an execute's arrival to its function running",
            buckets=START_BUCKETS, registry=r)
        self.handed_on = Counter("bento_executes_handed_on", "Executes this cluster node was too full for "
                                 "and another node took, by the node that took it", ["node"], registry=r)
        self.taken = Counter("bento_executes_taken", "Executes another cluster node handed on that this "
                             "node started", registry=r)
        self.frames_out = Counter("bento_frames_out", "Frames sent to attachments in out events", registry=r)
        self.inputs = Counter("bento_inputs", "Input frames accepted from owners", registry=r)
        self.gap_frames = Counter(
            "bento_gap_frames", "Frames attachments skipped, by reason: dropped by the buffer "
            "policy, or acked (freed by the owner before they were asked for)", ["reason"], registry=r)
        self.errors = Counter("bento_errors", "Error answers and events sent to clients, by code",
                              ["code"], registry=r)
        self.guesses_failed = Counter(
            "bento_token_guesses_failed", "Token look-ups that matched no session", registry=r)
        self.guesses_refused = Counter(
            "bento_token_guesses_refused", "Token requests refused because the peer's "
            "failed-guess allowance was spent", registry=r)
        r.register(StateCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def executed(self, s: Session, nursery: trio.Nursery) -> None:
        """Count an execute, and time its function's start (from the session's creation)."""
        self.executes.inc()
        if s.snap.state == State.STARTING.value:
            nursery.start_soon(self._watch_start, s)
        else:
            self._started(s)  # a warm environment's session runs already: no task on the reply's path

    async def _watch_start(self, s: Session) -> None:
        with trio.move_on_after(START_WATCH_S):
            while s.snap.state == State.STARTING.value and not s.removed:
                await s.changed.wait()
        self._started(s)

    def _started(self, s: Session) -> None:
        latency = time.time() - s.created
        if s.snap.state not in NOT_STARTED and latency < START_WATCH_S:
            self.start_seconds.observe(max(0.0, latency))


# A function that never ran has no start latency to observe.
NOT_STARTED = (State.STARTING.value, State.FAILED.value, State.LOST.value)


class StateCollector(Collector):
    """Figures read from the server's live state when scraped."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        registry = self.server.registry
        states = dict.fromkeys(protocol.STATES, 0)
        modes = dict.fromkeys(MODES, 0)
        buffered = 0
        for s in registry.sessions.values():
            states[s.snap.state] = states.get(s.snap.state, 0) + 1
            buffered += s.snap.buffer_bytes
            for att in s.attachments:
                modes[att.mode] = modes.get(att.mode, 0) + 1
        sessions = GaugeMetricFamily("bento_sessions", "Sessions this server holds, by state",
                                     labels=["state"])
        for state, n in states.items():
            sessions.add_metric([state], n)
        yield sessions
        attachments = GaugeMetricFamily("bento_attachments", "Attachments, by mode (rw: owner, ro: viewer)",
                                        labels=["mode"])
        for mode, n in modes.items():
            attachments.add_metric([mode], n)
        yield attachments
        yield GaugeMetricFamily("bento_buffer_bytes", "Output bytes retained in session buffers "
                                "(not yet acknowledged by owners)", value=buffered)
        yield GaugeMetricFamily("bento_warm_pool", "Warm environments ready for executes",
                                value=len(registry.exchanges.warm))
        yield GaugeMetricFamily("bento_warm_pool_target", "Warm environments the pool is kept at now "
                                "(--pool, more while executes come fast, at most --pool-max)",
                                value=registry.exchanges.sizing.target(trio.current_time()))
        yield GaugeMetricFamily("bento_sandbox_template_up", "1 while the sandbox template forks environments; "
                                "0: each environment is a bwrap of its own (not used here, off, or restarting)",
                                value=1 if registry.exchanges.sandbox_template.path else 0)
        yield GaugeMetricFamily("bento_connections", "Open WebSocket connections",
                                value=sum(self.server.peers.values()))
        traffic = self.server.traffic
        yield CounterMetricFamily("bento_received_bytes", "WebSocket bytes received from clients",
                                  value=traffic.received)
        yield CounterMetricFamily("bento_sent_bytes", "WebSocket bytes sent to clients", value=traffic.sent)
        yield from self.admission()

    def admission(self) -> Iterator[Metric]:
        """Capacity and per-key usage (bento/admission.py); keys by their short id."""
        gate = self.server.gate
        stats = gate.admission.statistics()
        for name, what, value in (
            ("running", "Functions running now (admitted executes whose function has not ended)",
             stats["running"]),
            ("max_running", "Most functions running at once (--max-sessions)", stats["max_running"]),
            ("memory_committed_bytes", "Sum of the running functions' memory limits", stats["memory"]),
            ("memory_budget_bytes", "The most that sum may reach (--memory-budget)", stats["memory_budget"]),
            ("disk_free_bytes", "Free bytes in the data dir's file system", gate.disk_free()),
            ("disk_floor_bytes", "Below this much free space new executes are refused (--disk-floor)",
             stats["disk_floor"]),
            ("queued_executes", "Executes waiting in the queue for capacity", stats["queued"]),
        ):
            yield GaugeMetricFamily(f"bento_{name}", what, value=value)
        running = GaugeMetricFamily("bento_key_running", "Functions running, by API key id", labels=["key"])
        memory = GaugeMetricFamily("bento_key_memory_bytes", "Memory limits committed, by API key id",
                                   labels=["key"])
        executes = CounterMetricFamily("bento_key_executes", "Executes admitted, by API key id",
                                       labels=["key"])
        for key, used in gate.admission.usage.items():
            running.add_metric([key_id(key)], used.running)
            memory.add_metric([key_id(key)], used.memory)
            executes.add_metric([key_id(key)], used.executes)
        yield from (running, memory, executes)
