"""bento.files on a temporary dir: hostile paths and trees, symlinks and FIFOs never followed."""

from __future__ import annotations

import os

import pytest

from bento import files


@pytest.mark.parametrize("path", [
    "../x", "a/../../x", "a/..", "/abs", "//abs", "", ".", "./", "a\0b", "a\\..\\b", "x" * 1025,
    "/".join(["d"] * 33), "n" * 256,
])
def test_bad_paths(path):
    with pytest.raises(files.FileError):
        files.check_path(path)


def test_good_paths_are_normalised():
    assert files.check_path("a/./b//c.txt") == ["a", "b", "c.txt"]
    assert files.check_path("..a/b..") == ["..a", "b.."]


def test_tree_caps_and_clashes():
    assert files.check_tree({"a/b": b"1", "c": b"22"}, 3) == {("a", "b"): b"1", ("c",): b"22"}
    with pytest.raises(files.FileError, match="more than this server's 2"):
        files.check_tree({"a/b": b"1", "c": b"22"}, 2)
    with pytest.raises(files.FileError, match="more than 10000"):
        files.check_tree({str(i): b"" for i in range(files.MAX_FILES + 1)}, 1)
    with pytest.raises(files.FileError, match="both a file and a directory"):
        files.check_tree({"a": b"", "a/b": b""}, 10)
    with pytest.raises(files.FileError, match="same file"):
        files.check_tree({"a/b": b"", "a//b": b""}, 10)


def test_write_and_read_stay_inside_and_follow_no_symlink(tmp_path):
    root = tmp_path / "work"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    files.write_tree(str(root), files.check_tree({"d/e/f.txt": b"hello", "g": b""}, 100))
    assert (root / "d/e/f.txt").read_bytes() == b"hello"
    assert files.read_file(str(root), ["d", "e", "f.txt"], 1, 3) == (b"ell", 5)
    assert files.write_file(str(root), ["d", "e", "f.txt"], 5, b"!", truncate=False) == 6

    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "secret", root / "filelink")
    os.mkfifo(root / "fifo")
    for parts in (["dirlink", "secret"], ["filelink"], ["fifo"]):
        with pytest.raises(files.FileError):
            files.read_file(str(root), parts, 0, 10)
        with pytest.raises(files.FileError):
            files.write_file(str(root), parts, 0, b"x", truncate=True)
    assert (outside / "secret").read_bytes() == b"secret"
    assert sorted(os.listdir(outside)) == ["secret"]
    with pytest.raises(files.FileError) as info:
        files.read_file(str(root), ["nope", "x"], 0, 1)
    assert info.value.code == "not_found"
