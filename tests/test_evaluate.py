"""Evaluation: aggregates, the rollout protocol (seeding, even split, explicit resets), JSON, video, CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from eva_rl import stats
from eva_rl.evaluate import (EpisodeRecord, EvalResult, aggregate, evaluate, evaluate_reference,
                             load_policy, summarize)
from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

PENDULUM = "Pendulum-v1"  # 3-dim obs, 1-dim action, never terminates: episodes last exactly the horizon


def pendulum_policy(state_dim: int = 3, seed: int = 0) -> DecisionTransformerPolicy:
    torch.manual_seed(seed)
    config = PolicyConfig.from_preset("tiny", state_dim=state_dim, act_dim=1)
    metadata = PolicyMetadata(state_mean=np.zeros(state_dim), state_std=np.ones(state_dim), return_scale=100.0,
                              tasks=(PENDULUM,), target_returns={PENDULUM: -100.0}, obs_dims=(3,), act_dims=(1,))
    return DecisionTransformerPolicy(config, metadata)


def returns(result: EvalResult) -> list[float]:
    return [r.episode_return for r in result.episodes]


# -- aggregates ----------------------------------------------------------------------------------

def test_summarize_exact_numbers():
    s = summarize([0.0, 1.0, 1.0, 1.0])
    assert s["mean"] == 0.75 and s["n"] == 4
    assert s["stderr"] == pytest.approx(0.5 / 2)  # sample std 0.5, sqrt(4) = 2
    assert s["iqm"] == 1.0  # drops one value at each end: mean of [1, 1]
    assert 0.0 <= s["ci95_low"] <= 0.75 <= s["ci95_high"] == 1.0
    assert summarize([0.0, 1.0, 1.0, 1.0]) == s  # the bootstrap is seeded

    skewed = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert skewed["mean"] == 22.0
    assert skewed["iqm"] == 3.0  # floor(5/4) = 1 dropped at each end: mean of [2, 3, 4]
    assert skewed["stderr"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1) / math.sqrt(5))
    assert stats.iqm(np.arange(8.0)) == 3.5  # drops 2 each end: mean of [2, 3, 4, 5]

    one = summarize([7.0])
    assert math.isnan(one.pop("stderr"))  # one value has no spread to estimate (eva_rl.stats' convention)
    assert one == {"mean": 7.0, "iqm": 7.0, "ci95_low": 7.0, "ci95_high": 7.0, "n": 1}


@pytest.mark.parametrize("values, match", [([], "at least one"), ([1.0, float("nan")], "non-finite")])
def test_summarize_errors(values, match):
    with pytest.raises(ValueError, match=match):
        summarize(values)


def test_aggregate_per_task_and_suite():
    def record(task, i, ret, success, length=10):
        return EpisodeRecord(task=task, episode=i, env=i, seed=i, episode_return=ret, length=length, success=success)

    episodes = [record("a", 0, 10.0, True), record("a", 1, 20.0, False),
                record("b", 0, 0.0, True), record("b", 1, 30.0, True, length=20)]
    per_task, suite = aggregate(episodes)
    assert list(per_task) == ["a", "b"]
    assert per_task["a"]["success"]["mean"] == 0.5 and per_task["b"]["success"]["mean"] == 1.0
    assert per_task["a"]["return"]["mean"] == 15.0 and per_task["b"]["return"]["mean"] == 15.0
    assert per_task["a"]["return"]["stderr"] == pytest.approx(5.0)
    assert suite["success"]["mean"] == 0.75 and suite["return"]["mean"] == 15.0 and suite["length"]["mean"] == 12.5
    assert suite["return"]["iqm"] == 15.0 and suite["success"]["n"] == 4


def test_normalized_score_where_the_task_has_references():
    # Hopper-v5's D4RL references (envs/mujoco.yaml): random -20.272305, expert 3234.3
    lo, hi = -20.272305, 3234.3
    episodes = [EpisodeRecord("Hopper-v5", i, i, i, ret, 1000, True) for i, ret in enumerate([lo, hi, 1607.0])]
    per_task, suite = aggregate(episodes)
    expected = [0.0, 100.0, 100 * (1607.0 - lo) / (hi - lo)]
    assert per_task["Hopper-v5"]["score"]["mean"] == pytest.approx(np.mean(expected))
    assert suite["score"]["stderr"] == pytest.approx(np.std(expected, ddof=1) / math.sqrt(3))
    assert "normalised score" in EvalResult(episodes, per_task, suite).describe()
    # Meta-World has no reference returns: no score, rather than a made-up one
    per_task, suite = aggregate([EpisodeRecord("reach-v3", 0, 0, 0, 10.0, 5, True)])
    assert "score" not in suite and "score" not in per_task["reach-v3"]
    assert "normalised score" not in EvalResult([], per_task, suite).describe()


def test_eval_result_json_round_trip(tmp_path):
    episodes = [EpisodeRecord("a", 0, 0, 3, 1.5, 4, True), EpisodeRecord("a", 1, 1, 4, 2.5, 4, False)]
    per_task, suite = aggregate(episodes)
    result = EvalResult(episodes, per_task, suite, settings={"agent": "policy", "seed": 3}, env_steps=8)
    path = result.to_json(tmp_path / "out" / "eval.json")
    data = json.loads(path.read_text())
    assert data["episodes"][0] == {"task": "a", "episode": 0, "env": 0, "seed": 3, "return": 1.5, "length": 4,
                                   "success": True}
    assert data["suite"]["success"]["mean"] == 0.5 and data["tasks"]["a"]["return"]["mean"] == 2.0
    assert EvalResult.from_json(path) == result
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left
    assert "suite" in result.describe()


# -- rollouts ------------------------------------------------------------------------------------

def test_evaluate_is_deterministic_and_splits_episodes_evenly():
    policy = pendulum_policy()
    first = evaluate(policy, [PENDULUM], episodes=5, seed=3, num_envs=2, horizon=12)
    again = evaluate(policy, [PENDULUM], episodes=5, seed=3, num_envs=2, horizon=12)
    assert returns(first) == returns(again)
    assert [(r.env, r.seed) for r in first.episodes] == [(0, 3), (0, 3), (1, 4), (1, 4), (1, 4)]
    assert [r.episode for r in first.episodes] == [0, 1, 2, 3, 4]
    # no reset step is counted: every episode is exactly the horizon, and nothing else was stepped
    assert all(r.length == 12 for r in first.episodes)
    assert first.env_steps == 5 * 12
    assert len(set(returns(first))) == 5  # successive episodes of an env start from different states
    other_seed = evaluate(policy, [PENDULUM], episodes=5, seed=4, num_envs=2, horizon=12)
    assert returns(other_seed) != returns(first)
    # env i's episodes do not depend on how many envs run beside it
    single = evaluate(policy, [PENDULUM], episodes=2, seed=3, num_envs=1, horizon=12)
    assert returns(single) == returns(first)[:2]
    assert first.settings["target_returns"] == {PENDULUM: -100.0} and first.settings["num_envs"] == 2
    assert first.suite["return"]["n"] == 5


def test_pipelined_asynchronous_evaluation_equals_the_synchronous_one():
    """Two groups of envs in worker processes, acting in turn: 7 episodes on 3 envs (quotas 2, 2, 3)
    give groups of 2 and 1 envs and a tail where one env runs alone."""
    policy = pendulum_policy()
    sync = evaluate(policy, PENDULUM, episodes=7, seed=5, num_envs=3, horizon=9)
    pipelined = evaluate(policy, PENDULUM, episodes=7, seed=5, num_envs=3, horizon=9, asynchronous=True)
    assert [r.to_dict() for r in pipelined.episodes] == [r.to_dict() for r in sync.episodes]
    assert pipelined.env_steps == sync.env_steps == 7 * 9
    assert pipelined.settings["asynchronous"] and not sync.settings["asynchronous"]
    assert pipelined.worker_cpu_seconds > 0 and sync.worker_cpu_seconds == 0


def test_reference_agents_use_the_same_protocol():
    random_a = evaluate_reference("random", PENDULUM, episodes=4, seed=1, num_envs=4, horizon=6)
    random_b = evaluate_reference("random", PENDULUM, episodes=4, seed=1, num_envs=4, horizon=6)
    assert returns(random_a) == returns(random_b)
    in_processes = evaluate_reference("random", PENDULUM, episodes=4, seed=1, num_envs=4, horizon=6, asynchronous=True)
    assert returns(in_processes) == returns(random_a)
    assert [r.seed for r in random_a.episodes] == [1, 2, 3, 4] and random_a.settings["agent"] == "random"
    with pytest.raises(ValueError, match="Unknown reference agent 'oracle'"):
        evaluate_reference("oracle", PENDULUM, 1, 0)
    with pytest.raises(ValueError, match="no scripted expert"):
        evaluate_reference("expert", PENDULUM, 1, 0)


def test_target_return_changes_the_conditioning():
    policy = pendulum_policy()
    low = evaluate(policy, PENDULUM, episodes=2, seed=0, num_envs=2, horizon=8, target_returns=-1000.0)
    high = evaluate(policy, PENDULUM, episodes=2, seed=0, num_envs=2, horizon=8, target_returns={PENDULUM: 1000.0})
    assert returns(low) != returns(high)
    assert high.settings["target_returns"] == {PENDULUM: 1000.0}


def test_evaluate_errors():
    policy = pendulum_policy()
    with pytest.raises(ValueError, match="episodes must be a positive integer"):
        evaluate(policy, PENDULUM, episodes=0, seed=0)
    with pytest.raises(ValueError, match="num_envs must be a positive integer"):
        evaluate(policy, PENDULUM, episodes=2, seed=0, num_envs=0)
    with pytest.raises(ValueError, match="No target return for task 'Hopper-v5'"):
        evaluate(policy, "Hopper-v5", episodes=1, seed=0)
    narrow = DecisionTransformerPolicy(PolicyConfig.from_preset("tiny", state_dim=2, act_dim=1),
                                       PolicyMetadata(state_mean=np.zeros(2), state_std=np.ones(2),
                                                      target_returns={PENDULUM: 0.0}))
    with pytest.raises(ValueError, match=r"env has obs/action dims \(3, 1\) but the policy was not trained on it, and takes \(2, 1\)"):
        evaluate(narrow, PENDULUM, episodes=1, seed=0, horizon=4)


def test_cli_evaluates_a_checkpoint_and_a_reference(tmp_path, capsys):
    from eva_rl.cli import main

    pendulum_policy().save_pretrained(tmp_path / "model")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "model"), "--episodes", "2", "--num-envs", "2", "--horizon", "5",
                 "--target-return", f"{PENDULUM}=-50", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["target_returns"] == {PENDULUM: -50.0} and len(data["episodes"]) == 2
    assert main(["evaluate", "--reference", "random", "--tasks", PENDULUM, "--episodes", "1", "--horizon", "3"]) == 0
    assert "Pendulum-v1" in capsys.readouterr().out
    assert main(["evaluate", "--episodes", "1"]) == 2
    assert "Name the checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "model"), "--target-return", "high"]) == 2
    assert "is not VALUE or TASK=VALUE" in capsys.readouterr().err


def test_load_policy_applies_a_saved_adapter_to_its_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    policy = pendulum_policy()
    policy.save_pretrained(tmp_path / "base")
    policy.model = get_peft_model(policy.model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False,
                                                           fan_in_fan_out=True))
    policy.metadata = PolicyMetadata(**{**policy.metadata.to_dict(), "target_returns": {PENDULUM: -20.0}})
    policy.model.save_pretrained(tmp_path / "adapter")
    info = {"checkpoint": str(tmp_path / "base"), "metadata": policy.metadata.to_dict()}
    (tmp_path / "adapter" / "eva_rl_adapter.json").write_text(json.dumps(info))
    loaded = load_policy(tmp_path / "adapter")
    assert loaded.metadata.target_returns == {PENDULUM: -20.0}
    obs = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(loaded.act(loaded.start_rollout(2, 0.0), obs),
                               policy.eval().act(policy.start_rollout(2, 0.0), obs), atol=1e-6)
    assert load_policy(tmp_path / "base").metadata.target_returns == {PENDULUM: -100.0}
    info["checkpoint"] = str(tmp_path / "moved")
    (tmp_path / "adapter" / "eva_rl_adapter.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="pass the pretrained checkpoint with base="):
        load_policy(tmp_path / "adapter")
    assert load_policy(tmp_path / "adapter", base=tmp_path / "base").metadata.target_returns == {PENDULUM: -20.0}
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_policy(tmp_path)
    (tmp_path / "adapter" / "eva_rl_adapter.json").write_text('{"checkpoint": ')  # a write cut short
    with pytest.raises(ValueError, match="eva_rl_adapter.json' is not valid JSON"):
        load_policy(tmp_path / "adapter")


# -- Meta-World: success flags through the vector env, and video -----------------------------------

def _gl_backend_or_skip(monkeypatch) -> None:
    if "MUJOCO_GL" not in os.environ:  # through monkeypatch: the setting ends with the test
        monkeypatch.setenv("MUJOCO_GL", "egl" if torch.cuda.is_available() else "osmesa")
    backend = os.environ["MUJOCO_GL"]
    try:
        if backend == "osmesa":
            from mujoco.osmesa import GLContext
        elif backend == "egl":
            from mujoco.egl import GLContext
        else:
            from mujoco.glfw import GLContext
        GLContext(8, 8).free()
    except Exception as exc:  # missing libOSMesa / libEGL / display: nothing here can render
        pytest.skip(f"MuJoCo cannot render offscreen with MUJOCO_GL={backend}: {exc!r} "
                    f"(on Debian: apt-get install libosmesa6)")


@pytest.mark.slow
def test_expert_succeeds_on_reach_and_the_first_episode_is_recorded(tmp_path, monkeypatch):
    _gl_backend_or_skip(monkeypatch)  # imageio-ffmpeg is a dependency: no importorskip that would hide its absence
    import imageio.v2 as imageio

    result = evaluate_reference("expert", "reach-v3", episodes=1, seed=0, num_envs=1, horizon=80,
                                video_dir=tmp_path, video_every=20)
    assert result.episodes[0].success and result.success_rate == 1.0
    frames = imageio.mimread(tmp_path / "reach-v3.mp4")
    assert len(frames) == 5  # the reset frame and every 20th of 80 steps
    assert frames[0].shape == (240, 240, 3)
    assert all(frame.std() > 5.0 for frame in frames)  # not blank
    assert not np.array_equal(frames[0], frames[-1])  # the arm moved
