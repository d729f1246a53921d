"""The exchange's periodic checks: the work dir's bound (bento/exchange_workdir.py), the CPU limit."""

from bento.exchange_workdir import INTERVAL_S, WorkDirWatch


def test_the_first_check_is_an_interval_after_the_start_then_every_interval(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 64 * 1024)
    watch = WorkDirWatch(str(tmp_path), 4096, start=100.0)
    assert not watch.over(100.0)  # not at the start: nothing walked yet
    assert not watch.over(100.0 + INTERVAL_S / 2)
    assert watch.over(100.0 + INTERVAL_S)  # due: over the bound
    assert not watch.over(100.0 + INTERVAL_S * 1.5)  # (at most once per check)
    assert watch.over(100.0 + INTERVAL_S * 2)


def test_under_the_bound_in_bytes_and_in_names_is_not_over(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small").write_bytes(b"x" * 100)
    assert not WorkDirWatch(str(tmp_path), 1 << 20, start=0.0).over(INTERVAL_S)


def test_the_first_cpu_check_is_when_the_function_could_first_reach_its_limit():
    import types

    from bento.exchange_environment import CPU_CHECK_MAX_S, CPU_CHECK_MIN_S, CPUS, EnvironmentLife

    def interval(cpu_s, used):
        ex = types.SimpleNamespace(limits=types.SimpleNamespace(cpu_s=cpu_s))
        return EnvironmentLife.cpu_check_interval(ex, used)  # type: ignore[arg-type]

    assert interval(2.0 * CPUS, 0.0) == min(2.0, CPU_CHECK_MAX_S)
    assert interval(2.0 * CPUS, 1.0 * CPUS) == min(1.0, CPU_CHECK_MAX_S)
    assert interval(0.001, 0.0) == CPU_CHECK_MIN_S  # a tiny limit: not a busy loop of checks
    assert interval(10_000.0, 0.0) == CPU_CHECK_MAX_S
