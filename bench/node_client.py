"""The independent client's figures: bench/node/stream.mjs (Node, stock `ws` and
`cbor-x`) run against the server and against the bare server, same bytes.

Available when ``node`` is on PATH and ``bench/node/node_modules`` is installed
(`make bench` runs ``npm ci`` there when Node is present); :func:`missing` says
why not otherwise, and the rows carry that instead of a figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import chain

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
SCRIPT = os.path.join(HERE, "stream.mjs")


def missing() -> str | None:
    """Why the Node client cannot run here, or None."""
    if shutil.which("node") is None:
        return "no `node` on PATH (install Node.js to measure an independent client)"
    if not os.path.isdir(os.path.join(HERE, "node_modules", "ws")):
        return "bench/node/node_modules missing (run `npm ci --prefix bench/node`)"
    return None


def execute_fields(kind: str, amount: int) -> dict:
    """The execute request's fields for the same function as chain.stream_live's."""
    if kind == "big":
        return {"code": chain.CODE_BIG, "args": [amount // chain.FRAME],
                "buffer": {"max_bytes": 16 * 1024 * 1024, "policy": "block"}}
    return {"code": chain.CODE_SMALL, "args": [amount], "buffer": {"max_bytes": 64 * 1024 * 1024, "policy": "block"}}


def stream(mode: str, url: str, kind: str, amount: int) -> float:
    """One run: the rate (bytes/s for "big", frames/s for "small")."""
    argv = ["node", SCRIPT, mode, url, kind, str(amount)]
    if mode == "bento":
        argv.append(json.dumps(execute_fields(kind, amount)))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"node stream.mjs {mode} {kind}: {r.stderr.strip() or r.returncode}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    expect = (amount // chain.FRAME) * chain.FRAME if kind == "big" else amount
    if got["total"] != expect:
        raise RuntimeError(f"node stream.mjs {mode} {kind}: {got['total']} received of {expect}")
    return float(got["rate"])
