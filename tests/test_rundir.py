"""A run directory's state: the one config comparison, the one finished marker, the one check
before a config writes into a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eva_rl.rundir import (check_run_dir, check_same_config, config_differences, complete_checkpoints,
                           find_checkpoint, is_finished)

DEFAULTS = {"steps": 100, "eval_steps": [], "resume": False, "optim": {"lr": 1e-4, "warmup_steps": 10}}


def test_a_key_the_saved_config_lacks_is_equal_at_its_default_only() -> None:
    current = {"steps": 5, "eval_steps": [], "resume": True, "optim": {"lr": 1e-3, "warmup_steps": 10}}
    saved = {"steps": 5, "resume": False, "optim": {"lr": 1e-3}}  # before a release added eval_steps, warmup_steps
    assert config_differences(saved, current, DEFAULTS, free=("resume",)) == []
    moved = {**current, "eval_steps": [0], "optim": {"lr": 1e-3, "warmup_steps": 3}}
    assert config_differences(saved, moved, DEFAULTS, free=("resume",)) == [
        "eval_steps: checkpoint unset, now [0]", "optim.warmup_steps: checkpoint unset, now 3"]
    # without defaults (or a key the defaults do not know) an absent key differs
    assert config_differences(saved, current, free=("resume",)) == [
        "eval_steps: checkpoint unset, now []", "optim.warmup_steps: checkpoint unset, now 10"]
    # present with another value, and a key the current config no longer has, differ
    assert config_differences({**saved, "steps": 6, "gone": 1}, current, DEFAULTS, free=("resume",)) == [
        "gone: checkpoint 1, now unset", "steps: checkpoint 6, now 5"]
    # free keys are skipped at any depth; without them resume differs
    assert config_differences(saved, current, DEFAULTS) == ["resume: checkpoint False, now True"]


def test_a_section_a_release_added_is_compared_key_by_key() -> None:
    defaults = {"steps": 1, "eva": {"tau": 0.99, "rho": 1.0}}
    assert config_differences({"steps": 1}, {"steps": 1, "eva": {"tau": 0.99, "rho": 1.0}}, defaults) == []
    assert config_differences({"steps": 1}, {"steps": 1, "eva": {"tau": 0.9, "rho": 1.0}}, defaults,
                              saved_as="run.json") == ["eva.tau: run.json unset, now 0.9"]


def test_check_same_config_names_every_differing_key() -> None:
    check_same_config({"steps": 5}, {"steps": 5, "eval_steps": [], "out_dir": "elsewhere"}, DEFAULTS)
    with pytest.raises(ValueError, match=r"Cannot resume: .*eval_steps: checkpoint unset, now \[0\]; "
                                         r"steps: checkpoint 5, now 6\)\. Resume with the same config"):
        check_same_config({"steps": 5}, {"steps": 6, "eval_steps": [0]}, DEFAULTS)


def _checkpoint(run_dir: Path, step: int, config: dict) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    for name in ("trainer.pt", "model.safetensors"):
        (path / name).write_bytes(b"x")
    (path / "meta.json").write_text(json.dumps({"config": config, "step": step}))
    return path


def test_complete_checkpoints_and_finished_runs(tmp_path: Path) -> None:
    assert complete_checkpoints(tmp_path / "checkpoints") == [] and find_checkpoint(tmp_path / "nothing") is None
    first, second = _checkpoint(tmp_path, 3, {}), _checkpoint(tmp_path, 6, {})
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # a stray dir without its files
    (second / "trainer.pt").unlink()
    assert complete_checkpoints(tmp_path / "checkpoints") == [first]
    assert not is_finished(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    assert is_finished(tmp_path)


def test_check_run_dir_refuses_another_runs_directory(tmp_path: Path) -> None:
    config = {"steps": 5, "eval_steps": [], "resume": True}
    assert check_run_dir(tmp_path / "new", config, DEFAULTS, resume=False) is None  # nothing there: start fresh
    found = _checkpoint(tmp_path, 3, {"steps": 5, "resume": False})  # written before eval_steps existed
    with pytest.raises(FileExistsError, match=r"already holds checkpoints of a run \(step_00000003\)\. Pass --resume"):
        check_run_dir(tmp_path, config, DEFAULTS, resume=False)
    assert check_run_dir(tmp_path, config, DEFAULTS, resume=True) == found
    with pytest.raises(ValueError, match=r"eval_steps: checkpoint unset, now \[2\]"):
        check_run_dir(tmp_path, {**config, "eval_steps": [2]}, DEFAULTS, resume=True)
    # the whole config in a file of the run dir (fine-tuning's config.yaml), read as written
    (tmp_path / "config.yaml").write_text("steps: 5\nmethod: lora\nresume: false\n")
    with pytest.raises(ValueError, match="method: checkpoint 'lora', now 'dora'"):
        check_run_dir(tmp_path, {**config, "method": "dora"}, {**DEFAULTS, "method": "eva"}, resume=True,
                      config_file="config.yaml")
    assert check_run_dir(tmp_path, {**config, "method": "lora"}, DEFAULTS, True, config_file="config.yaml") == found


def test_check_run_dir_refuses_a_finished_run_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a finished run \(metrics.json\)\. Pass --resume"):
        check_run_dir(tmp_path, {"steps": 5}, DEFAULTS, resume=False)
    with pytest.raises(FileExistsError, match="finished run .* and no checkpoint to resume from"):
        check_run_dir(tmp_path, {"steps": 5}, DEFAULTS, resume=True)
