"""`make bench` still runs: the benchmark in its smallest mode (`--quick --smoke`),
as a subprocess with a tight time budget. It checks that the run works and
prints every row with a number, not that any target is met."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 150


def _bwrap_works() -> bool:
    import bento_sandbox

    return bento_sandbox.default_backend() == "bwrap"


@pytest.mark.slow
def test_bench_smoke_runs_and_prints_every_row(tmp_path):
    if not _bwrap_works():
        pytest.skip("the benchmark measures the bwrap sandbox; bwrap does not work here")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from jupyter_ceiling import missing as no_jupyter
        from node_client import missing
        from run import ROW_SPECS
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    out_json = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--smoke", "--json", str(out_json)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        stdout, stderr = proc.communicate(timeout=BUDGET_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the bench stop its servers and their exchanges first.
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"bench --quick --smoke took over {BUDGET_S} s\n{stderr.decode(errors='replace')[-3000:]}")
    text = stdout.decode()
    err = stderr.decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text}\n{err[-3000:]}"

    report = json.loads(out_json.read_text())
    rows = {r["key"]: r for r in report["rows"]}
    table_lines = text.splitlines()
    # The Node client's rows need Node and bench/node's packages (`make test`
    # installs them when npm is present); without them they say why, and only that.
    no_node = missing()
    # So do the Jupyter rows without bench/jupyter/.venv (`make test` installs it when PyPI answers).
    without = {"node_": no_node, "first_jupyter": no_jupyter(), "first_gateway": no_jupyter()}
    for key, *_ in ROW_SPECS:
        assert key in rows, key
        row = rows[key]
        why = next((w for prefix, w in without.items() if key.startswith(prefix)), None)
        if why is not None:
            assert row["error"] == why, (key, row["error"])
            continue
        assert row["error"] is None, (key, row["error"])
        assert isinstance(row["p50"], (int, float)) and math.isfinite(row["p50"]), (key, row)
        # The printed table has the row, with a number in its p50 column (a
        # difference may be negative: the server's RSS per idle session is one
        # over a few sessions in the smoke run, and RSS can shrink meanwhile).
        line = next((ln for ln in table_lines if ln.startswith(row["name"])), None)
        assert line is not None, f"{row['name']!r} missing from the table\n{text}"
        cells = line[len(row["name"]):].split()
        assert any(re.match(r"-?[0-9]", c) for c in cells[1:2]), line
    for key in ("first_bwrap", "echo", "big_live", "small_live", "reattach", "loaded_echo"):
        assert rows[key]["ceiling"] is not None, key
    if no_jupyter() is None:
        for key in ("first_jupyter", "first_gateway"):
            assert rows[key]["ceiling"] is not None, key
    assert "met?" in text and "ceiling" in text
    assert report["machine"]["cores"] >= 1
