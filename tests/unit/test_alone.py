"""The ``alone`` marker (tests/alone.py): under two xdist workers, no other test
runs while an ``alone`` test does, the ``alone`` tests run as one block, and
the ordinary tests still run two at a time."""

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


# Collected last (test_z.py), after the others.
SEVERAL_ALONE = RECORD + '''
@pytest.mark.alone
@pytest.mark.parametrize("n", range(3))
def test_alone(n):
    record(f"alone{n}", 0.3)
'''


def run_two_workers(tmp_path, files: dict[str, str], *args: str) -> dict[str, tuple[float, float]]:
    """Run the test files under two xdist workers with the plugin: each test's span."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    log = tmp_path / "log"
    env = dict(os.environ, ALONE_LOG=str(log), PYTHONPATH=TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", *args, "-p", "alone", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = {}
    for line in log.read_text().splitlines():
        name, start, end = line.split()
        spans[name] = (float(start), float(end))
    return spans


def test_an_alone_test_overlaps_no_other(tmp_path):
    spans = run_two_workers(tmp_path, {"test_a.py": ALONE, "test_b.py": OTHERS})
    assert len(spans) == 7, spans
    a_start, a_end = spans.pop("alone")
    overlapping = [n for n, (s, e) in spans.items() if s < a_end and e > a_start]
    assert not overlapping, (spans, (a_start, a_end))
    # The others still ran two at a time (else the plugin serialised everything).
    others = sorted(spans.values())
    assert any(s2 < e1 for (_, e1), (s2, _) in zip(others, others[1:], strict=False)), others


def test_the_alone_tests_run_as_one_block(tmp_path):
    # No ordinary test starts between the first alone test's start and the last
    # one's end (under worksteal, as make test runs the suite).
    spans = run_two_workers(tmp_path, {"test_b.py": OTHERS, "test_z.py": SEVERAL_ALONE}, "--dist", "worksteal")
    assert len(spans) == 9, spans
    alone = [v for k, v in spans.items() if k.startswith("alone")]
    first, last = min(s for s, _ in alone), max(e for _, e in alone)
    inside = [k for k, (s, e) in spans.items() if not k.startswith("alone") and s < last and e > first]
    assert not inside, spans
