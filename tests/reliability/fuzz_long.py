"""The long fuzz run (``make fuzz``): the protocol decoder and validator in
process, then a live server, with the machinery of test_fuzz_live.py.

    python tests/reliability/fuzz_long.py [--cases 100000] [--decoder-cases 200000]
        [--hypothesis-examples 20000] [--workers 8] [--seed N]

Phases:
1. decoder: ``--decoder-cases`` generated messages (valid-looking requests,
   mutations, truncations, structural attacks, random bytes) through
   ``protocol.decode`` + ``parse_request``, each checked by ``check_pipeline``;
2. hypothesis: ``--hypothesis-examples`` requests and mutated requests, the same checks;
3. live: ``--cases`` messages at a real ``bento server`` from ``--workers``
   connections, while a control session streams (see ``LiveFuzz``).

Prints cases/s and every finding (with the message that caused it, in hex);
exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import cbor2  # noqa: E402
import trio  # noqa: E402
from helpers import ServerProcess  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fuzz_live import (  # noqa: E402
    MAX_MESSAGE,
    SERVER_ARGS,
    Gen,
    LiveFuzz,
    apply_edits,
    check_pipeline,
    edits,
    fuzz_server,
    requests,
)


def show(data: bytes | str) -> str:
    return (data.hex() if isinstance(data, bytes) else repr(data))[:400]


def decoder_phase(cases: int, seed: int) -> list[str]:
    gen = Gen(random.Random(seed))
    findings: list[str] = []
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(1, cases + 1):
        data = gen.message()
        if isinstance(data, str):
            continue
        try:
            out = check_pipeline(data)
            outcomes[out] = outcomes.get(out, 0) + 1
        except Exception as exc:  # noqa: BLE001 - every failure is a finding to report
            findings.append(f"{type(exc).__name__}: {exc}; message: {show(data)}")
        if i % 50_000 == 0:
            print(f"  decoder: {i} cases, {i / (time.monotonic() - t0):.0f} cases/s", flush=True)
    dt = time.monotonic() - t0
    print(f"decoder: {cases} cases in {dt:.1f} s ({cases / dt:.0f} cases/s): {outcomes}; "
          f"{len(findings)} findings", flush=True)
    return findings


def hypothesis_phase(examples: int) -> list[str]:
    findings: list[str] = []
    count = 0
    message = (requests().map(cbor2.dumps)
               | st.tuples(requests(), edits).map(lambda t: apply_edits(cbor2.dumps(t[0]), t[1])))

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(message)
    def run(data: bytes) -> None:
        nonlocal count
        count += 1
        check_pipeline(data)

    t0 = time.monotonic()
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - hypothesis raises the (shrunk) failure
        findings.append("".join(traceback.format_exception_only(exc)).strip())
    dt = time.monotonic() - t0
    print(f"hypothesis: {count} examples in {dt:.1f} s ({count / dt:.0f} cases/s); "
          f"{len(findings)} findings", flush=True)
    return findings


def live_phase(cases: int, workers: int, seed: int) -> list[str]:
    tmp = tempfile.mkdtemp(prefix="bento-fuzz-")
    srv = ServerProcess(os.path.join(tmp, "data"), *SERVER_ARGS).start()
    fuzz = LiveFuzz(srv.url, seed=seed, cases=cases, workers=workers, max_executes=300)

    async def progress() -> None:
        t0 = time.monotonic()
        while True:
            await trio.sleep(15)
            n = fuzz.stats.cases
            print(f"  live: {n} cases, {n / (time.monotonic() - t0):.0f} cases/s, "
                  f"{len(fuzz.findings)} findings", flush=True)

    async def main() -> int:
        async with trio.open_nursery() as n:
            n.start_soon(progress)
            lines, _ = await fuzz_server(srv, fuzz, timeout=3600)
            n.cancel_scope.cancel()
        return lines

    t0 = time.monotonic()
    lines = 0
    try:
        lines = trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - a crash of the run is itself a finding
        fuzz.finding("the live run failed: " + "".join(traceback.format_exception(exc))[-3000:])
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    dt = time.monotonic() - t0
    s = fuzz.stats
    print(f"live: {s.cases} cases in {dt:.1f} s ({s.cases / dt:.0f} cases/s) on "
          f"{s.connections} connections ({workers} at a time, max message {MAX_MESSAGE}); "
          f"closes {dict(s.closes)}; replies {dict(s.replies)}; events {dict(s.events)}; "
          f"{s.executed} sessions started and destroyed; control session {lines} lines; "
          f"{len(fuzz.findings)} findings", flush=True)
    return fuzz.findings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000, help="live cases (default 100000)")
    ap.add_argument("--decoder-cases", type=int, default=200_000)
    ap.add_argument("--hypothesis-examples", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    print(f"fuzz: seed {args.seed}", flush=True)
    findings = []
    if args.decoder_cases:
        findings += decoder_phase(args.decoder_cases, args.seed)
    if args.hypothesis_examples:
        findings += hypothesis_phase(args.hypothesis_examples)
    if args.cases:
        findings += live_phase(args.cases, args.workers, args.seed)
    total = args.decoder_cases + args.hypothesis_examples + args.cases
    print(f"fuzz: {total} cases in all, {len(findings)} findings")
    for f in findings[:100]:
        print("FINDING:", f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
