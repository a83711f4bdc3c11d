"""Atomic files and directories: a failed or killed writer never loses the old version."""

import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eva_rl import storage


@pytest.fixture(params=["exchange", "journal"])
def mode(request, monkeypatch):
    """Run a test with Linux's atomic exchange and with the journal used where it is missing."""
    if request.param == "journal":
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    elif storage._renameat2 is None:
        pytest.skip("no renameat2 on this system")
    return request.param


def _dir(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights.bin").write_text(text)
    return path


def test_replace_dir_swaps_in_the_new_directory_and_removes_the_old(tmp_path, mode):
    final = _dir(tmp_path / "final", "old")
    storage.replace_dir(_dir(tmp_path / ".final.new", "new"), final)
    assert (final / "weights.bin").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["final"]
    storage.replace_dir(_dir(tmp_path / ".other", "first"), tmp_path / "fresh")  # no old one
    assert (tmp_path / "fresh" / "weights.bin").read_text() == "first"


def test_a_failed_directory_swap_puts_the_old_one_back(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    final, new = _dir(tmp_path / "final", "old"), _dir(tmp_path / "new", "new")
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src) == new:
            raise OSError("cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", failing_rename)
    with pytest.raises(OSError, match="cross-device"):
        storage.replace_dir(new, final)
    assert (final / "weights.bin").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final", "new"]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_recover_dir_puts_back_the_old_directory_of_an_interrupted_swap(tmp_path, caplog):
    # the state a kill between the journal's two renames leaves: journal, aside copy, no final
    journal = tmp_path / ".final.replace.json"
    live = _dir(tmp_path / f".final.{os.getppid()}-{storage._HOST}.old-x", "old")
    journal.write_text('{"aside": "%s", "new": ".final.x"}' % live.name)
    assert storage.recover_dir(tmp_path / "final") is False and live.exists()  # a running swap is left alone
    aside = live.rename(tmp_path / f".final.{_dead_pid()}-{storage._HOST}.old-x")
    journal.write_text('{"aside": "%s", "new": ".final.x"}' % aside.name)
    with caplog.at_level(logging.WARNING):
        assert storage.recover_dir(tmp_path / "final") is True
    assert (tmp_path / "final" / "weights.bin").read_text() == "old" and "restored the previous" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # eva-rl 0.1's two-rename swap left `.NAME.old-XXXX` and nothing at NAME: that is put back too
    legacy = _dir(tmp_path / ".data.old-1a2b3c4d", "legacy")
    assert storage.recover_dir(tmp_path / "data") is True and not legacy.exists()
    assert (tmp_path / "data" / "weights.bin").read_text() == "legacy"
    assert storage.recover_dir(tmp_path / "data") is False  # nothing to do


def test_leftovers_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path):
    dead_pid = _dead_pid()
    stale_dir = _dir(tmp_path / f".ckpt.{dead_pid}-{storage._HOST}.abcd", "half")
    stale_file = tmp_path / f".ckpt.{dead_pid}-{storage._HOST}.ef.tmp.json"
    stale_file.write_text("{")
    live = _dir(tmp_path / f".ckpt.{os.getpid()}-{storage._HOST}.gh", "being written")
    other_host = _dir(tmp_path / f".ckpt.{dead_pid}-ffffffff.ij", "another machine's")
    storage.remove_leftovers(tmp_path / "ckpt")
    assert not stale_dir.exists() and not stale_file.exists() and live.exists() and other_host.exists()


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


def test_a_directory_writer_that_fails_midway_leaves_the_old_directory(tmp_path, mode):
    target = tmp_path / "adapter"
    with storage.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("good")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "weights.bin").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


# ------------------------------------------------------------------------------------------------
# Killed at each rename: a dataset, a policy checkpoint and an adapter still load afterwards
# ------------------------------------------------------------------------------------------------

# Each defines write(root, version) (version 1 or 2 of its kind), read(root) -> the version it
# finds, and final(root) -> the replaced path.
_WRITERS = {
    "dataset": """
        from eva_rl.data.collect import CollectConfig, collect_tasks
        def write(root, version):
            config = CollectConfig(policy="random", episodes=version, horizon=3, out=str(root), overwrite=True)
            list(collect_tasks(["Pendulum-v1"], config, progress=False))
        def read(root):
            from eva_rl.data.trajectories import load_trajectories
            return load_trajectories([str(root / "eva-rl" / "Pendulum-v1-random-v0")]).num_episodes
        final = lambda root: root / "eva-rl" / "Pendulum-v1-random-v0"
    """,
    "checkpoint": """
        import torch
        from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata, load_policy
        def write(root, version):
            torch.manual_seed(version)
            config = PolicyConfig.from_preset("tiny", state_dim=2, act_dim=1, n_layer=version)
            policy = DecisionTransformerPolicy(config, PolicyMetadata(state_mean=[0, 0], state_std=[1, 1]))
            policy.save_pretrained(root / "final")
        def read(root):
            return load_policy(root / "final").config.n_layer
        final = lambda root: root / "final"
    """,
    "adapter": """
        import torch
        from eva_rl.adapters.methods import apply_method, save_adapter
        from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata, load_policy
        def base(root):
            if not (root / "base").exists():
                torch.manual_seed(0)
                config = PolicyConfig.from_preset("tiny", state_dim=2, act_dim=1)
                DecisionTransformerPolicy(config, PolicyMetadata(state_mean=[0, 0], state_std=[1, 1])).save_pretrained(root / "base")
            return load_policy(root / "base")
        def write(root, version):
            policy = apply_method(base(root), "lora", rank=version)
            save_adapter(policy, root / "final", extra={"checkpoint": str(root / "base")})
        def read(root):
            model = load_policy(root / "final").model
            return model.peft_config["default"].r
        final = lambda root: root / "final"
    """,
}

def _write_and_die(write, root, step: str, mode: str) -> None:
    """In a forked child: write version 2 and die (os._exit) right after the rename `step`."""
    if mode == "journal":
        storage._exchange = lambda a, b: False

    def die_at(at: str) -> None:
        if at == step:
            os._exit(9)

    storage._after_rename = die_at
    write(root, 2)
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dataset", "checkpoint", "adapter"])
def test_a_replacement_killed_after_any_rename_leaves_a_whole_version(tmp_path, kind, monkeypatch, caplog):
    if storage._renameat2 is None:
        pytest.skip("no renameat2 on this system")
    writer = textwrap.dedent(_WRITERS[kind])
    namespace: dict = {}
    exec(writer, namespace)
    # (mode, the rename after which the writer dies, the version found afterwards)
    cases = [("exchange", "exchange", 2), ("journal", "aside", 1), ("journal", "swap", 2)]
    for i, (mode, step, expected) in enumerate(cases):
        root = tmp_path / str(i)
        root.mkdir()
        namespace["write"](root, 1)
        # a forked child (the parent's imports already done) that dies with os._exit: no cleanup runs
        child = multiprocessing.get_context("fork").Process(target=_write_and_die,
                                                            args=(namespace["write"], root, step, mode))
        child.start()
        child.join(300)
        assert child.exitcode == 9, (mode, step, child.exitcode)  # died at that rename, not before
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert namespace["read"](root) == expected, (mode, step)
        assert ("restored the previous version" in caplog.text) == (step == "aside")
        final = namespace["final"](root)
        leftovers = [p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")]
        assert leftovers == [], leftovers  # the dead writer's temporary copies are gone once it was opened
