"""bento.envs without an index: spec checking and normalising, names, locks, eviction."""

from __future__ import annotations

import json
import os
import time

import pytest

from bento import envs


def test_normalise_is_canonical():
    assert envs.normalise(["Pandas <3", "six", "SIX", "requests[Socks, security] >= 2, <3", "zope.interface"]) == [
        "pandas<3", "requests[security,socks]<3,>=2", "six", "zope-interface"]
    assert envs.normalise([]) == []
    assert envs.env_hash(["six"], "/py") == envs.env_hash(envs.normalise(["Six"]), "/py")
    assert envs.env_hash(["six"], "/py") != envs.env_hash(["six"], "/other-py")


@pytest.mark.parametrize("spec", [
    "--index-url=http://x", "-e .", "-r req.txt", "/etc/passwd", "./dir", "../up", "pkg @ https://x/p.whl",
    "file:///etc/passwd", "six; python_version>'3'", "six\nidna", "six idna", "", " ", "x" * 201, "six==",
    "six[", "_six", "six-",
])
def test_anything_but_a_plain_requirement_is_refused(spec):
    with pytest.raises(envs.SpecError):
        envs.normalise([spec])


def test_too_many_specs():
    with pytest.raises(envs.SpecError, match="at most"):
        envs.normalise([f"p{i}" for i in range(envs.MAX_SPECS + 1)])


def _fake_env(envs_dir: str, name: str, size: int, used: float) -> None:
    site = os.path.join(envs_dir, name, envs.SITE)
    os.makedirs(site)
    with open(os.path.join(site, "blob"), "wb") as f:
        f.write(b"x" * size)
    ready = os.path.join(envs_dir, name, envs.READY)
    with open(ready, "w") as f:
        json.dump({"specs": [name], "bytes": size}, f)
    os.utime(ready, (used, used))


def test_eviction_goes_least_recently_used_first_and_spares_what_is_in_use(tmp_path):
    d = str(tmp_path)
    now = time.time()
    for i, name in enumerate(["aaa", "bbb", "ccc", "ddd"]):
        _fake_env(d, name, 100, now - 100 + i)
    held = envs.use(d, "aaa")  # the oldest, but a running function holds it (and now it is fresh)
    assert held is not None
    os.utime(os.path.join(d, "aaa", envs.READY), (now - 200, now - 200))
    try:
        assert envs.evict(d, 250, keep="ddd") == ["bbb", "ccc"]
    finally:
        os.close(held)
    assert sorted(e["name"] for e in envs.listing(d)) == ["aaa", "ddd"]
    assert envs.use(d, "bbb") is None
    assert envs.evict(d, 100, keep="ddd") == ["aaa"]  # let go of: removable now


def test_remove_refuses_one_in_use(tmp_path):
    d = str(tmp_path)
    _fake_env(d, "aaa", 10, time.time())
    held = envs.use(d, "aaa")
    assert held is not None
    try:
        assert envs.remove(d, "aaa") is False
        assert [e["in_use"] for e in envs.listing(d)] == [True]
    finally:
        os.close(held)
    assert envs.remove(d, "aaa") is True
    with pytest.raises(FileNotFoundError):
        envs.remove(d, "aaa")
