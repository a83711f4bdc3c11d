"""SAC experts: snapshots, resume, the Zoo's settings, and collect replaying the zips."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eva_rl.data.collect import CollectConfig, collect_episodes
from eva_rl.data.experts import ExpertConfig, expert_paths, snapshot_path, train_expert, zoo_hyperparameters

# A small buffer keeps the pickled replay buffer small; early learning makes the updates run.
TINY = {"learning_starts": 50, "buffer_size": 2_000, "policy_kwargs": {"net_arch": [16, 16]}}


def test_zoo_hyperparameters_serve_every_version_of_a_body():
    assert zoo_hyperparameters("Hopper-v5") == {"steps": 1_000_000, "learning_starts": 10_000}
    assert zoo_hyperparameters("Pendulum-v1")["learning_rate"] == 1e-3


def test_unknown_body_and_bad_fields_are_named():
    with pytest.raises(ValueError, match="no SAC hyperparameters for 'reach-v3'"):
        zoo_hyperparameters("reach-v3")
    with pytest.raises(ValueError, match="save_every"):
        ExpertConfig(task="Pendulum-v1", out="x", save_every=-1)
    with pytest.raises(ValueError, match="steps"):
        ExpertConfig(task="Pendulum-v1", out="x", steps=0)


def test_snapshot_steps_merge_save_at_and_save_every_and_end_at_the_total():
    config = ExpertConfig(task="Hopper-v5", out="x", steps=100, save_at=(30, 500), save_every=40)
    assert config.snapshot_steps() == [30, 40, 80, 100]
    assert ExpertConfig(task="Hopper-v5", out="x").snapshot_steps() == [1_000_000]


@pytest.mark.slow
def test_train_snapshot_resume_and_collect(tmp_path, monkeypatch):
    import torch
    from stable_baselines3 import SAC

    import eva_rl.data.collect as collect_module

    out = tmp_path / "experts"
    first = train_expert(ExpertConfig(task="Pendulum-v1", out=str(out), steps=200, save_at=(100,),
                                      eval_episodes=1, sac_overrides=TINY))
    assert first.steps == 200 and [s["steps"] for s in first.snapshots] == [100, 200]
    assert snapshot_path(out, "Pendulum-v1", 100).is_file() and first.path.is_file()
    assert np.isfinite(first.snapshots[0]["mean_return"]) and first.snapshots[0]["steps_per_second"] > 0 < first.snapshots[0]["steps_per_cpu_second"]
    loaded = SAC.load(first.path, device="cpu")
    assert loaded.num_timesteps == 200 and loaded.learning_starts == 50

    with pytest.raises(FileExistsError, match="--resume"):
        train_expert(ExpertConfig(task="Pendulum-v1", out=str(out), steps=300, sac_overrides=TINY))
    resumed = train_expert(ExpertConfig(task="Pendulum-v1", out=str(out), steps=300, eval_episodes=0,
                                        resume=True, sac_overrides=TINY))
    assert resumed.steps == 300 and [s["steps"] for s in resumed.snapshots] == [100, 200, 300]
    log = json.loads(expert_paths(out, "Pendulum-v1")["log"].read_text())
    assert log["hyperparameters"]["learning_rate"] == 1e-3 and len(log["snapshots"]) == 3
    assert (expert_paths(out, "Pendulum-v1")["resume"] / "replay_buffer.pkl").is_file()
    assert SAC.load(first.path).num_timesteps == 300  # the final zip now holds the continued policy

    rollout_threads = []
    roll_out = collect_module._roll_out
    monkeypatch.setattr(collect_module, "_roll_out",
                        lambda *a: rollout_threads.append(torch.get_num_threads()) or roll_out(*a))
    threads = torch.get_num_threads()
    episodes = collect_episodes("Pendulum-v1", CollectConfig(policy=f"sb3:{first.path}", noise=0.0,
                                                             episodes=1, horizon=20))
    # one observation at a time: one torch thread while rolling out, the caller's afterwards
    assert rollout_threads == [1] and torch.get_num_threads() == threads
    assert episodes[0]["actions"].shape == (20, 1)
    replay = SAC.load(first.path, device="cpu")
    expected, _ = replay.predict(episodes[0]["observations"][0], deterministic=True)
    np.testing.assert_allclose(episodes[0]["actions"][0], expected, rtol=1e-5)


def test_resume_without_state_says_how_to_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="Drop --resume"):
        train_expert(ExpertConfig(task="Pendulum-v1", out=str(tmp_path), steps=10, resume=True))


@pytest.mark.slow
def test_cli_writes_a_zip_collect_uses(tmp_path):
    out = tmp_path / "e"
    args = [sys.executable, "-m", "eva_rl.cli", "expert", "Pendulum-v1", "--out", str(out), "--steps", "120",
            "--save-at", "60", "--eval-episodes", "1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "120 steps ->" in done.stdout and (out / "Pendulum-v1-sac-60.zip").is_file()
    collect = [sys.executable, "-m", "eva_rl.cli", "collect", "--task", "Pendulum-v1", "--policy",
               f"sb3:{out / 'Pendulum-v1-sac.zip'}", "--episodes", "1", "--horizon", "10", "--out",
               str(tmp_path / "data")]
    done = subprocess.run(collect, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert any((tmp_path / "data").rglob("*.hdf5"))


MODELS = Path(__file__).resolve().parents[2] / "models"
# about half of what each final policy scored on this start when it was trained (100, 74, 67)
FLOOR = {"Hopper-v5": 50.0, "Walker2d-v5": 35.0, "HalfCheetah-v5": 33.0}


@pytest.mark.parametrize("task", ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"])
def test_the_shipped_experts_act_on_their_bodies_and_beat_their_medium_snapshots(task):
    """configs/mujoco.yaml's behaviour policies (models/, trained by `eva-rl expert`): each loads
    through collect's SB3 path, fits its body's spaces, and on the same seeded start the final
    policy earns more than its 100k-step snapshot and than a D4RL-normalised score of FLOOR."""
    from eva_rl.envs import normalized_score

    returns = {}
    for name in (f"{task}-sac-100000.zip", f"{task}-sac.zip"):
        [episode] = collect_episodes(task, CollectConfig(policy=f"sb3:{MODELS / name}", noise=0.0, episodes=1))
        returns[name] = float(episode["rewards"].sum())
    score = normalized_score(task, returns[f"{task}-sac.zip"])
    assert returns[f"{task}-sac.zip"] > returns[f"{task}-sac-100000.zip"], returns
    assert score > FLOOR[task], (score, returns)
