"""Atomic files and directories: a failed or killed writer never loses the old version."""

import os
from pathlib import Path

import pytest

from eva_rl import storage


def test_a_failed_directory_swap_puts_the_old_one_back(tmp_path, monkeypatch):
    final, new = tmp_path / "final", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == new:
            raise OSError("cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device"):
        storage.replace_dir(new, final)
    assert (final / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final", "new"]


def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "eva" / "components.safetensors"
    storage.write_text_atomic(target, "good")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".safetensors"
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "good" and [p.name for p in target.parent.iterdir()] == [target.name]
    with storage.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == [target.name]
    assert target.stat().st_mode & 0o777 == 0o666 & ~storage._UMASK  # not mkstemp's owner-only 0600


def test_a_directory_writer_that_fails_midway_leaves_the_old_directory(tmp_path):
    target = tmp_path / "adapter"
    with storage.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("good")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "weights.bin").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["adapter"]
