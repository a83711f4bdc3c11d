"""Loading Minari datasets into memory, returns-to-go, and K-step window sampling."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from eva_rl.data.trajectories import TrajectoryDataset, load_trajectories


def make_episode(
    length: int, obs_dim: int = 2, act_dim: int = 1, *, value: float = 0.0, task: str | None = None
) -> dict:
    """obs[t] = [t, 10 t, ...] + value, actions[t] = t + value, rewards[t] = t + 1 + value; T+1 observations."""
    t = np.arange(length + 1, dtype=np.float32)
    observations = t[:, None] * (10.0 ** np.arange(obs_dim, dtype=np.float32)) + value
    episode = {
        "observations": observations,
        "actions": np.repeat(t[:length, None] + value, act_dim, axis=1),
        "rewards": t[:length] + 1 + value,
        "terminations": np.zeros(length, dtype=bool),
        "truncations": np.arange(length) == length - 1,
    }
    if task is not None:
        episode["task"] = task
    return episode


class FixedStarts:
    """Stands in for np.random.Generator so a test chooses the window start steps exactly."""

    def __init__(self, starts: list[int]) -> None:
        self.starts = np.array(starts, dtype=np.int64)

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        assert size == len(self.starts) and (self.starts < high).all()
        return self.starts


def raw_stats(dim: int) -> dict:
    """Identity normalisation, so sampled states equal the raw observations."""
    return {"state_mean": np.zeros(dim), "state_std": np.ones(dim)}


def write_minari(
    root: Path, dataset_id: str, episodes: list[dict], task: str | None = "toy-task", obs_dim: int = 2, act_dim: int = 1
) -> Path:
    """A Minari dataset written like `eva-rl collect` does (no env needed); returns its directory."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [
        EpisodeBuffer(
            observations=ep["observations"],
            actions=ep["actions"],
            rewards=ep["rewards"],
            terminations=ep["terminations"],
            truncations=ep["truncations"],
            infos={"success": ep["success"]} if "success" in ep else None,
        )
        for ep in episodes
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari nags about missing author/description metadata
        dataset = minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32),
            action_space=gym.spaces.Box(-np.inf, np.inf, (act_dim,), np.float32),
        )
    if task is not None:
        dataset.storage.update_metadata({"eva_rl_task": task})
    return Path(dataset.storage.data_path).parent


@pytest.fixture
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


# ----------------------------------------------------------------------------- arrays


def test_returns_to_go_timesteps_and_episode_returns_on_hand_made_episodes():
    episodes = [make_episode(3), {**make_episode(1), "rewards": np.array([10.0])}]
    data = TrajectoryDataset.from_episodes(episodes, "a")
    np.testing.assert_array_equal(data.returns_to_go, [6.0, 5.0, 3.0, 10.0])  # rewards 1,2,3 | 10
    np.testing.assert_array_equal(data.timesteps, [0, 1, 2, 0])
    np.testing.assert_array_equal(data.episode_starts, [0, 3])
    np.testing.assert_array_equal(data.episode_lengths, [3, 1])
    np.testing.assert_array_equal(data.episode_returns, [6.0, 10.0])
    assert data.max_return("a") == 10.0
    assert data.observations.shape == (4, 2)  # the final (T+1-th) observation is dropped
    assert data.observations.flags.c_contiguous and data.observations.dtype == np.float32
    assert data.timesteps.dtype == np.int64


def test_returns_to_go_are_accurate_over_long_data():
    # a float32 running sum over 200k steps would drift by far more than 1e-3
    rewards = np.full(200_000, 0.1, dtype=np.float32)
    episode = {**make_episode(200_000), "rewards": rewards}
    data = TrajectoryDataset.from_episodes([episode], "a")
    assert abs(data.returns_to_go[0] - 20_000.0) < 1e-2
    assert abs(data.returns_to_go[-1] - 0.1) < 1e-6


def test_episode_returns_raw_arrays_at_true_width():
    data = TrajectoryDataset.from_episodes([make_episode(3), make_episode(2, value=5.0)], "a")
    ep = data.episode(1)
    np.testing.assert_array_equal(ep["rewards"], [6.0, 7.0])
    np.testing.assert_array_equal(ep["observations"][:, 0], [5.0, 6.0])
    np.testing.assert_array_equal(ep["timesteps"], [0, 1])
    assert ep["task"] == "a"
    with pytest.raises(IndexError, match="2 episodes"):
        data.episode(2)


# ----------------------------------------------------------------------------- windows


def test_windows_at_episode_start_middle_and_end_are_exact():
    # episode 0: 5 steps (rows 0-4), episode 1: 4 steps (rows 5-8); K = 3
    data = TrajectoryDataset.from_episodes(
        [make_episode(5), make_episode(4, value=100.0)], "a", return_scale=10.0, **raw_stats(2)
    )
    batch = data.sample(5, 3, generator=FixedStarts([0, 2, 3, 4, 8]))
    np.testing.assert_array_equal(
        batch["attention_mask"].numpy(), [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 1]]
    )
    np.testing.assert_array_equal(batch["timesteps"].numpy(), [[0, 1, 2], [2, 3, 4], [0, 3, 4], [0, 0, 4], [0, 0, 3]])
    # the window starting at step 3 stops at the episode end: it never reads episode 1's rows
    np.testing.assert_array_equal(batch["states"][2].numpy(), [[0, 0], [3, 30], [4, 40]])
    np.testing.assert_array_equal(batch["states"][4].numpy(), [[0, 0], [0, 0], [103, 130]])
    np.testing.assert_array_equal(batch["actions"][3, :, 0].numpy(), [0, 0, 4])
    np.testing.assert_array_equal(batch["rewards"][1, :, 0].numpy(), [3, 4, 5])
    # RTG of episode 0 is 15, 14, 12, 9, 5 (rewards 1..5), divided by return_scale 10
    np.testing.assert_allclose(batch["returns_to_go"][0, :, 0].numpy(), [1.5, 1.4, 1.2])
    np.testing.assert_allclose(batch["returns_to_go"][2, :, 0].numpy(), [0.0, 0.9, 0.5])
    np.testing.assert_array_equal(batch["task_ids"].numpy(), [0, 0, 0, 0, 0])


def test_sample_shapes_and_dtypes():
    data = TrajectoryDataset.from_episodes([make_episode(7, 3, 2), make_episode(2, 3, 2)], "a")
    batch = data.sample(6, 4, generator=np.random.default_rng(0))
    expected = {
        "states": ((6, 4, 3), torch.float32),
        "actions": ((6, 4, 2), torch.float32),
        "rewards": ((6, 4, 1), torch.float32),
        "returns_to_go": ((6, 4, 1), torch.float32),
        "timesteps": ((6, 4), torch.int64),
        "attention_mask": ((6, 4), torch.int64),
        "task_ids": ((6,), torch.int64),
    }
    assert {key: (tuple(value.shape), value.dtype) for key, value in batch.items()} == expected


def test_context_longer_than_every_episode_pads_every_window():
    data = TrajectoryDataset.from_episodes([make_episode(2), make_episode(3)], "a")
    batch = data.sample(50, 8, generator=np.random.default_rng(1))
    real = batch["attention_mask"].sum(dim=1)
    assert real.min() >= 1 and real.max() <= 3
    assert (batch["attention_mask"][:, :5] == 0).all()
    padded = batch["attention_mask"] == 0
    assert (batch["states"][padded] == 0).all() and (batch["returns_to_go"][padded] == 0).all()


def test_states_are_normalised_with_dataset_statistics():
    rng = np.random.default_rng(0)
    episodes = [{**make_episode(50, 3), "observations": rng.normal(3.0, 2.0, size=(51, 3))} for _ in range(4)]
    for ep in episodes:
        ep["observations"][:, 2] = 7.0  # a constant dim: std floored, normalises to 0, no NaN
    data = TrajectoryDataset.from_episodes(episodes, "a")
    np.testing.assert_allclose(data.state_mean, data.observations.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(data.state_std[:2], data.observations[:, :2].std(axis=0), rtol=1e-5)
    assert data.state_std[2] == pytest.approx(1e-6)
    batch = data.sample(64, 1, generator=FixedStarts(list(range(0, 192, 3))))
    first = batch["states"][:, 0].numpy()
    expected = (data.observations[np.arange(0, 192, 3)] - data.state_mean) / data.state_std
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(batch["states"].numpy()).all() and (batch["states"][..., 2] == 0).all()


def test_with_normalization_shares_arrays_and_checks_width():
    data = TrajectoryDataset.from_episodes([make_episode(4, 2)], "a")
    before = data.sample(1, 1, generator=FixedStarts([3]))  # builds data's sampling tables
    other = data.with_normalization(np.array([1.0, 2.0]), np.array([2.0, 4.0]), return_scale=5.0)
    assert other.observations is data.observations and other.return_scale == 5.0
    batch = other.sample(1, 1, generator=FixedStarts([3]))
    np.testing.assert_allclose(batch["states"][0, 0].numpy(), [(3 - 1) / 2, (30 - 2) / 4])
    np.testing.assert_allclose(batch["returns_to_go"][0, 0, 0].item(), 4 / 5)
    assert data.return_scale == 1000.0  # the original is untouched
    assert torch.equal(data.sample(1, 1, generator=FixedStarts([3]))["states"], before["states"])
    # each has its own default generator: sampling one does not move the other's stream
    twin = data.with_normalization(None, None)
    first = data.sample(8, 2)["timesteps"]
    assert torch.equal(twin.sample(8, 2)["timesteps"], first)
    with pytest.raises(ValueError, match=r"state_mean has shape \(3,\), expected \(2,\)"):
        data.with_normalization(np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match=r"state_std has shape \(1,\), expected \(2,\)"):
        TrajectoryDataset.from_episodes([make_episode(4, 2)], "a", state_std=np.ones(1))


# ----------------------------------------------------------------------------- distribution


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def test_start_steps_are_drawn_in_proportion_to_episode_length():
    lengths = np.array([10, 30, 60])
    episodes = [{**make_episode(n), "rewards": np.full(n, float(i))} for i, n in enumerate(lengths)]
    data = TrajectoryDataset.from_episodes(episodes, "a")
    batch = data.sample(60_000, 1, generator=np.random.default_rng(0))
    counts = np.bincount(batch["rewards"][:, 0, 0].numpy().astype(int), minlength=3)
    # 99.9% critical value of chi-square with 2 degrees of freedom is 13.8
    assert chi_square(counts, lengths / lengths.sum()) < 13.8
    # and every step of an episode is equally likely as a start
    steps = np.bincount(batch["timesteps"][:, 0].numpy()[batch["rewards"][:, 0, 0].numpy() == 2], minlength=60)
    assert chi_square(steps, np.full(60, 1 / 60)) < 99.6  # 99.9% critical value, 59 dof


def test_balance_tasks_draws_tasks_uniformly():
    episodes = [make_episode(90, task="big"), make_episode(10, task="small")]
    data = TrajectoryDataset.from_episodes(episodes, ["big", "small"])
    plain = np.bincount(data.sample(20_000, 2, generator=np.random.default_rng(0))["task_ids"].numpy())
    balanced = data.sample(20_000, 1, generator=np.random.default_rng(0), balance_tasks=True)
    assert chi_square(plain, np.array([0.9, 0.1])) < 10.8  # 99.9%, 1 dof
    assert chi_square(np.bincount(balanced["task_ids"].numpy()), np.array([0.5, 0.5])) < 10.8
    small = balanced["timesteps"][:, 0].numpy()[balanced["task_ids"].numpy() == 1]
    assert small.max() == 9 and chi_square(np.bincount(small, minlength=10), np.full(10, 0.1)) < 27.9


def test_sampling_is_deterministic_given_a_seed():
    data = TrajectoryDataset.from_episodes([make_episode(30, task="a"), make_episode(8, task="b")], ["a", "b"])
    for balance in (False, True):
        first = data.sample(32, 5, generator=np.random.default_rng(7), balance_tasks=balance)
        again = data.sample(32, 5, generator=np.random.default_rng(7), balance_tasks=balance)
        other = data.sample(32, 5, generator=np.random.default_rng(8), balance_tasks=balance)
        assert all(torch.equal(first[key], again[key]) for key in first)
        assert not torch.equal(first["timesteps"], other["timesteps"])
    # without a generator, two fresh datasets agree with each other (own generator seeded 0)
    fresh = TrajectoryDataset.from_episodes([make_episode(30)], "a")
    twin = TrajectoryDataset.from_episodes([make_episode(30)], "a")
    assert torch.equal(fresh.sample(16, 4)["timesteps"], twin.sample(16, 4)["timesteps"])


# ----------------------------------------------------------------------------- split, tasks


def test_split_by_whole_episodes_per_task_with_the_same_normalisation():
    episodes = [make_episode(3 + i, value=100.0 * i, task="a") for i in range(10)]
    episodes += [make_episode(4, value=5000.0 + i, task="b") for i in range(4)]
    data = TrajectoryDataset.from_episodes(episodes, ["a", "b"])
    train, val = data.split(0.25, seed=0)
    assert (np.bincount(val.episode_tasks, minlength=2) == [2, 1]).all()  # round(2.5) = 2, round(1) = 1
    assert train.num_episodes + val.num_episodes == 14 and train.num_steps + val.num_steps == data.num_steps
    first_rewards = {float(d.episode(i)["rewards"][0]) for d in (train, val) for i in range(d.num_episodes)}
    assert first_rewards == {float(ep["rewards"][0]) for ep in episodes}  # disjoint, complete
    for part in (train, val):
        np.testing.assert_array_equal(part.state_mean, data.state_mean)
        assert part.task_names == ("a", "b")
        for i in range(part.num_episodes):  # RTG and timesteps rebuilt per kept episode
            assert part.episode(i)["returns_to_go"][0] == part.episode(i)["rewards"].sum()
            assert part.episode(i)["timesteps"][0] == 0
    again, _ = data.split(0.25, seed=0)
    np.testing.assert_array_equal(again.rewards, train.rewards)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        data.split(1.0, seed=0)
    with pytest.raises(ValueError, match="leaves no validation episode"):
        TrajectoryDataset.from_episodes([make_episode(3)], "a").split(0.5, seed=0)


def test_take_episodes_is_a_seeded_subset_per_task():
    episodes = [make_episode(3, value=100.0 * i, task="a") for i in range(10)]
    episodes += [make_episode(4, value=5000.0 + i, task="b") for i in range(6)]
    data = TrajectoryDataset.from_episodes(episodes, ["a", "b"])

    def firsts(part):  # first reward identifies an episode
        return [float(part.episode(i)["rewards"][0]) for i in range(part.num_episodes)]

    five = data.take_episodes(5, seed=3)
    assert np.bincount(five.episode_tasks, minlength=2).tolist() == [5, 5]
    assert firsts(five) == firsts(data.take_episodes(5, seed=3))  # seeded
    assert firsts(five) != firsts(data.take_episodes(5, seed=4))
    assert set(firsts(data.take_episodes(2, seed=3))) <= set(firsts(five))  # nested sizes at one seed
    np.testing.assert_array_equal(five.state_mean, data.state_mean)
    assert five.task_names == data.task_names
    with pytest.raises(ValueError, match="task 'b' has only 6 training episodes.*train.data.episodes"):
        data.take_episodes(7, seed=0)


def test_tasks_of_different_widths_are_zero_padded_with_true_dims_kept():
    episodes = [make_episode(4, 3, 1, task="narrow"), make_episode(5, 5, 2, task="wide")]
    data = TrajectoryDataset.from_episodes(episodes, ["narrow", "wide"])
    assert (data.state_dim, data.act_dim) == (5, 2)
    assert data.obs_dims == (3, 5) and data.act_dims == (1, 2)
    assert (data.observations[:4, 3:] == 0).all() and (data.actions[:4, 1] == 0).all()
    assert data.episode(0)["observations"].shape == (4, 3) and data.episode(1)["actions"].shape == (5, 2)
    batch = data.sample(64, 3, generator=np.random.default_rng(0))
    narrow = batch["task_ids"] == 0
    assert narrow.any() and (~narrow).any()
    assert (batch["actions"][narrow][..., 1] == 0).all()
    assert data.max_return("wide") == 15.0 and data.max_return(0) == 10.0
    with pytest.raises(ValueError, match="Unknown task 'other'"):
        data.max_return("other")


# ----------------------------------------------------------------------------- Minari


def test_minari_round_trip_by_path_and_by_id(minari_root: Path):
    episodes = [make_episode(4), make_episode(6, value=1.0)]
    episodes[1]["success"] = np.arange(7) >= 5  # T+1 flags: the reset info comes first
    episodes[0]["success"] = np.zeros(5, dtype=bool)
    directory = write_minari(minari_root, "eva-rl/toy-v0", episodes)
    sources = [directory, directory / "data", directory / "data" / "main_data.hdf5", str(directory), "eva-rl/toy-v0"]
    for source in sources:
        data = load_trajectories(source)
        assert data.task_names == ("toy-task",)  # from the eva_rl_task metadata key
        np.testing.assert_array_equal(data.episode_lengths, [4, 6])
        np.testing.assert_array_equal(data.observations, np.concatenate([ep["observations"][:-1] for ep in episodes]))
        np.testing.assert_array_equal(data.returns_to_go[:4], [10, 9, 7, 4])
        np.testing.assert_array_equal(data.success[4:], [False] * 4 + [True] * 2)
        np.testing.assert_array_equal(data.episode_success, [False, True])


def test_minari_multi_task_list_merges_same_task_and_pads(minari_root: Path):
    write_minari(minari_root, "eva-rl/one-v0", [make_episode(3)], task="x")
    write_minari(minari_root, "eva-rl/two-v0", [make_episode(4, 3, 2)], task=None, obs_dim=3, act_dim=2)
    write_minari(minari_root, "eva-rl/three-v0", [make_episode(5)], task="x")
    data = load_trajectories(["eva-rl/one-v0", "eva-rl/two-v0", "eva-rl/three-v0"], return_scale=10.0)
    assert data.task_names == ("x", "eva-rl/two-v0")  # no eva_rl_task and no env spec: the dataset id
    np.testing.assert_array_equal(data.episode_tasks, [0, 1, 0])
    assert data.obs_dims == (2, 3) and data.state_dim == 3 and data.return_scale == 10.0


# ----------------------------------------------------------------------------- bad input


def test_missing_path_and_unknown_id(minari_root: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        load_trajectories(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        load_trajectories(str(tmp_path / "nowhere" / "main_data.hdf5"))
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a local Minari dataset id"):
        load_trajectories("eva-rl/unknown-v0")
    with pytest.raises(ValueError, match="empty list"):
        load_trajectories([])


def test_a_missing_id_says_how_to_get_it_and_download_uses_minaris_own(minari_root: Path, monkeypatch):
    import minari.storage.local

    with pytest.raises(FileNotFoundError, match=r"minari download eva-rl/remote-v0.*train.data.download=true"):
        load_trajectories("eva-rl/remote-v0")
    fetched = []

    def download_dataset(dataset_id: str) -> None:  # stands in for Minari's server (no network here)
        fetched.append(dataset_id)
        write_minari(minari_root, dataset_id, [make_episode(4)], task="remote")

    monkeypatch.setattr(minari.storage.local.hosting, "download_dataset", download_dataset)
    data = load_trajectories("eva-rl/remote-v0", download=True)
    assert fetched == ["eva-rl/remote-v0"] and data.task_names == ("remote",) and data.num_steps == 4

    def offline(dataset_id: str) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(minari.storage.local.hosting, "download_dataset", offline)
    with pytest.raises(FileNotFoundError, match="could not download 'eva-rl/other-v0'.*no route to host"):
        load_trajectories("eva-rl/other-v0", download=True)


def test_directory_that_is_not_a_minari_dataset(tmp_path: Path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=r"is not a Minari dataset: expected .*metadata\.json"):
        load_trajectories(tmp_path)
    (tmp_path / "data" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="Cannot open the Minari dataset in .*data"):
        load_trajectories(tmp_path)


@pytest.mark.parametrize("damage", ["metadata", "missing hdf5"])
def test_a_damaged_dataset_named_by_id_says_what_is_wrong(minari_root: Path, damage: str):
    directory = write_minari(minari_root, "eva-rl/broken-v0", [make_episode(4)])
    if damage == "metadata":
        (directory / "data" / "metadata.json").write_text("{not json")
    else:
        (directory / "data" / "main_data.hdf5").unlink()
    with pytest.raises(ValueError, match=r"Cannot open the Minari dataset in .*broken-v0.*collect it again"):
        load_trajectories("eva-rl/broken-v0")  # not "neither a path nor a local id": it is there, damaged


def test_truncated_hdf5_file(minari_root: Path):
    directory = write_minari(minari_root, "eva-rl/cut-v0", [make_episode(20), make_episode(20)])
    file = directory / "data" / "main_data.hdf5"
    os.truncate(file, file.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"Cannot read .*main_data\.hdf5: it is truncated or corrupted.*again"):
        load_trajectories(directory)


def test_garbage_hdf5_file(minari_root: Path):
    directory = write_minari(minari_root, "eva-rl/junk-v0", [make_episode(5)])
    (directory / "data" / "main_data.hdf5").write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_trajectories(directory)


@pytest.mark.parametrize("key", ["observations", "actions", "rewards"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_name_the_episode_and_array(key: str, bad: float):
    episodes = [make_episode(4), make_episode(4)]
    episodes[1][key] = np.array(episodes[1][key], dtype=np.float32)
    episodes[1][key].reshape(-1)[2] = bad
    with pytest.raises(ValueError, match=rf"episode 1: {key} contains NaN or inf"):
        TrajectoryDataset.from_episodes(episodes, "a")


def test_non_finite_values_in_a_minari_file_name_the_file(minari_root: Path):
    episodes = [make_episode(4), make_episode(4)]
    episodes[1]["rewards"] = np.array([1.0, np.nan, 1.0, 1.0])
    directory = write_minari(minari_root, "eva-rl/nan-v0", episodes)
    with pytest.raises(ValueError, match=r"main_data\.hdf5 episode 1: rewards contains NaN or inf \(first at step 1\)"):
        load_trajectories(directory)


def test_empty_dataset(minari_root: Path):
    with pytest.raises(ValueError, match="holds no episodes"):
        TrajectoryDataset.from_episodes([], "a")
    directory = write_minari(minari_root, "eva-rl/empty-v0", [])
    with pytest.raises(ValueError, match=r"main_data\.hdf5 holds no episodes"):
        load_trajectories(directory)


def test_episode_without_steps():
    empty = {**make_episode(1), "rewards": np.zeros(0), "actions": np.zeros((0, 1))}
    empty.update(terminations=np.zeros(0), truncations=np.zeros(0), observations=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="episode 1 has no steps"):
        TrajectoryDataset.from_episodes([make_episode(3), empty], "a")


def test_mismatched_lengths_within_an_episode():
    short_actions = {**make_episode(5), "actions": np.zeros((4, 1))}
    with pytest.raises(ValueError, match="episode 0: actions has 4 rows but rewards has 5 steps"):
        TrajectoryDataset.from_episodes([short_actions], "a")
    long_obs = {**make_episode(5), "observations": np.zeros((7, 2))}
    with pytest.raises(ValueError, match="observations has 7 rows .* \\(expected 5 or 6\\)"):
        TrajectoryDataset.from_episodes([long_obs], "a")
    with pytest.raises(ValueError, match="lacks \\['truncations'\\]"):
        TrajectoryDataset.from_episodes([{k: v for k, v in make_episode(2).items() if k != "truncations"}], "a")


@pytest.mark.parametrize("key, value", [
    ("terminations", False), ("rewards", np.ones((3, 2))), ("truncations", np.zeros((3, 2), dtype=bool)),
])
def test_per_step_arrays_must_be_one_value_per_step(key, value):
    with pytest.raises(ValueError, match=rf"episode 0: {key} has shape .*expected one value per step"):
        TrajectoryDataset.from_episodes([{**make_episode(3), key: value}], "a")
    column = {**make_episode(3), "rewards": np.ones((3, 1))}  # (T, 1) is fine
    assert TrajectoryDataset.from_episodes([column], "a").num_steps == 3


def test_same_task_with_different_widths_is_refused():
    with pytest.raises(ValueError, match="of the same task 'a'"):
        TrajectoryDataset.from_episodes([make_episode(3, 2), make_episode(3, 4)], "a")


def test_bad_context_and_batch_size():
    data = TrajectoryDataset.from_episodes([make_episode(3)], "a")
    for context in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"context \(K\) must be an integer >= 1"):
            data.sample(4, context)
    with pytest.raises(ValueError, match="batch_size must be"):
        data.sample(0, 3)
    with pytest.raises(ValueError, match="return_scale must be"):
        TrajectoryDataset.from_episodes([make_episode(3)], "a", return_scale=0.0)
