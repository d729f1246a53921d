"""The ``alone`` marker (tests/alone.py): under two xdist workers, no other test
runs while an ``alone`` test does, and the ordinary tests still run two at a time."""

from __future__ import annotations

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each test appends "name start end" (monotonic seconds) to a shared file.
RECORD = '''
import os, time
import pytest

def record(name, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    with open(os.environ["ALONE_LOG"], "a") as f:
        f.write(f"{name} {start} {time.monotonic()}\\n")
'''

ALONE = RECORD + '''
@pytest.mark.alone
def test_alone():
    record("alone", 1.0)
'''

OTHERS = RECORD + '''
@pytest.mark.parametrize("n", range(6))
def test_other(n):
    record(f"other{n}", 0.4)
'''


def test_an_alone_test_overlaps_no_other(tmp_path):
    (tmp_path / "test_a.py").write_text(ALONE)
    (tmp_path / "test_b.py").write_text(OTHERS)
    log = tmp_path / "log"
    env = dict(os.environ, ALONE_LOG=str(log), PYTHONPATH=TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "alone", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = {}
    for line in log.read_text().splitlines():
        name, start, end = line.split()
        spans[name] = (float(start), float(end))
    assert len(spans) == 7, spans
    a_start, a_end = spans.pop("alone")
    overlapping = [n for n, (s, e) in spans.items() if s < a_end and e > a_start]
    assert not overlapping, (spans, (a_start, a_end))
    # The others still ran two at a time (else the plugin serialised everything).
    others = sorted(spans.values())
    assert any(s2 < e1 for (_, e1), (s2, _) in zip(others, others[1:], strict=False)), others
