import minari
import numpy as np
import pytest

from eva_rl.cli import main
from eva_rl.data import collect as collect_module
from eva_rl.data.collect import CollectConfig, collect_episodes, collect_tasks, dataset_id, policy_tag


def _collect(tmp_path, task="reach-v3", **kw):
    config = CollectConfig(**{"episodes": 2, "horizon": 20, "out": str(tmp_path), **kw})
    return list(collect_tasks([task], config, progress=False))[0]


def test_round_trip_through_plain_minari(tmp_path):
    summary = _collect(tmp_path, noise=0.2)
    assert summary.dataset_id == "eva-rl/reach-v3-expert-noise0p2-v0"
    dataset = minari.MinariDataset(summary.path / "data")
    assert dataset.total_episodes == 2 and dataset.total_steps == 40 == summary.steps
    episode = dataset[0]
    assert episode.observations.shape == (21, 39) and episode.actions.shape == (20, 4)
    assert episode.infos["success"].shape == (21,)
    assert np.all(np.abs(episode.actions) <= 1.0)
    meta = dataset.storage.metadata
    assert meta["eva_rl_task"] == "reach-v3" and meta["eva_rl_noise"] == 0.2 and meta["eva_rl_seed"] == 0
    assert meta["eva_rl_episodes"] == 2 and meta["eva_rl_horizon"] == 20
    returns = [dataset[i].rewards.sum() for i in range(2)]
    assert meta["eva_rl_mean_return"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert meta["eva_rl_success_rate"] == summary.success_rate


def test_collection_is_reproducible(tmp_path):
    config = CollectConfig(episodes=2, horizon=15, noise=0.3, seed=7)
    first, second = collect_episodes("push-v3", config), collect_episodes("push-v3", config)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = collect_episodes("push-v3", CollectConfig(episodes=1, horizon=15, noise=0.3, seed=8))
    assert not np.allclose(first[0]["observations"], other[0]["observations"])


def test_noise_changes_actions_and_zero_noise_is_the_expert(tmp_path):
    clean = collect_episodes("reach-v3", CollectConfig(episodes=1, horizon=10, noise=0.0))[0]
    noisy = collect_episodes("reach-v3", CollectConfig(episodes=1, horizon=10, noise=0.5))[0]
    np.testing.assert_array_equal(clean["observations"][0], noisy["observations"][0])
    assert not np.allclose(clean["actions"], noisy["actions"])
    assert policy_tag("expert", 0.0) == "expert" and policy_tag("random", 1.0) == "random-noise1"


def test_collect_episodes_leaves_a_callers_env_open():
    import gymnasium as gym

    from eva_rl.envs import make_env

    class CountCloses(gym.Wrapper):
        closes = 0

        def close(self):
            CountCloses.closes += 1
            super().close()

    config = CollectConfig(policy="random", noise=0.0, episodes=1, horizon=3)
    env = CountCloses(make_env("Pendulum-v1", 0, horizon=3))
    assert len(collect_episodes("Pendulum-v1", config, env)[0]["rewards"]) == 3
    assert CountCloses.closes == 0  # the caller owns it (collect_task reads its spaces afterwards)


def test_random_means_no_noise_unless_asked(tmp_path, capsys):
    assert CollectConfig(policy="random").action_noise == 0.0 and CollectConfig().action_noise == 0.1
    assert CollectConfig(policy="random", noise=0.3).action_noise == 0.3
    assert main(["collect", "--task", "Pendulum-v1", "--policy", "random", "--episodes", "1", "--horizon", "3",
                 "--out", str(tmp_path)]) == 0
    dataset = minari.MinariDataset(tmp_path / "eva-rl" / "Pendulum-v1-random-v0" / "data")
    assert dataset.storage.metadata["eva_rl_noise"] == 0.0


def test_random_policy_and_metadata_by_id(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    config = CollectConfig(policy="random", noise=0.0, episodes=3, horizon=10)
    summary = list(collect_tasks(["Pendulum-v1"], config, progress=False))[0]
    dataset = minari.load_dataset(dataset_id("Pendulum-v1", "random", 0.0), download=False)
    assert dataset.total_episodes == 3 and summary.success_rate in (0.0, 1 / 3, 2 / 3, 1.0)


def test_sb3_model_file(tmp_path):
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.save(tmp_path / "ppo_pendulum")
    summary = _collect(tmp_path, task="Pendulum-v1", policy=f"sb3:{tmp_path / 'ppo_pendulum.zip'}", noise=0.0)
    assert summary.dataset_id == "eva-rl/Pendulum-v1-sb3-ppo_pendulum-v0"
    episode = minari.MinariDataset(summary.path / "data")[0]
    expected, _ = model.predict(episode.observations[0], deterministic=True)
    np.testing.assert_allclose(episode.actions[0], expected, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="SB3 model file"):
        _collect(tmp_path, task="Pendulum-v1", policy="sb3:/nope.zip")
    # the wrong algorithm, or a model of another task: one clear error, not SB3's traceback
    with pytest.raises(ValueError, match=r"Cannot load .*ppo_pendulum\.zip as an SB3 SAC model.*sb3:.*:ALGO"):
        _collect(tmp_path, task="Pendulum-v1", policy=f"sb3:{tmp_path / 'ppo_pendulum.zip'}:sac", noise=0.0,
                 overwrite=True)
    with pytest.raises(ValueError, match=r"trained with observation space Box.*\(3,\).*task's is Box.*\(11,\)"):
        _collect(tmp_path, task="Hopper-v5", policy=f"sb3:{tmp_path / 'ppo_pendulum.zip'}", noise=0.0)


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    summary = _collect(tmp_path)
    before = (summary.path / "data" / "main_data.hdf5").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _collect(tmp_path)
    assert (summary.path / "data" / "main_data.hdf5").read_bytes() == before
    _collect(tmp_path, overwrite=True, episodes=3)
    assert minari.MinariDataset(summary.path / "data").total_episodes == 3
    assert [p.name for p in (tmp_path / "eva-rl").iterdir()] == ["reach-v3-expert-noise0p1-v0"]  # no temp folder left


def test_a_crash_while_writing_leaves_the_old_dataset(tmp_path, monkeypatch):
    summary = _collect(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("minari.dataset.minari_storage.MinariStorage.new", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _collect(tmp_path, overwrite=True, episodes=3)
    assert minari.MinariDataset(summary.path / "data").total_episodes == 2
    assert [p.name for p in (tmp_path / "eva-rl").iterdir()] == ["reach-v3-expert-noise0p1-v0"]  # no temp folder left


def test_bad_names_and_existing_datasets_fail_at_the_call_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(collect_module, "collect_task", lambda *a: pytest.fail("collected"))
    config = CollectConfig(episodes=1, out=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown task or suite 'nope-v3'"):
        collect_tasks(["reach-v3", "nope-v3"], config)  # not iterated: the call itself raises
    (tmp_path / dataset_id("push-v3", "expert", 0.1)).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="push-v3-expert-noise0p1-v0' already exists.*--overwrite"):
        collect_tasks(["reach-v3", "push-v3"], config)


@pytest.mark.parametrize("kwargs, message", [
    ({"episodes": 0}, "episodes"), ({"noise": -1.0}, "noise"), ({"policy": "expret"}, "policy"),
    ({"horizon": 0}, "horizon"), ({"workers": 0}, "workers"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CollectConfig(**kwargs)


def test_cli_collect_prints_summary(tmp_path, capsys):
    code = main(["collect", "--task", "reach-v3", "--episodes", "1", "--horizon", "10", "--noise", "0",
                 "--out", str(tmp_path)])
    assert code == 0
    assert "reach-v3: 1 episodes, 10 steps" in capsys.readouterr().out
    assert main(["collect", "--task", "nope-v3", "--out", str(tmp_path)]) == 2
    assert "Unknown task" in capsys.readouterr().err
