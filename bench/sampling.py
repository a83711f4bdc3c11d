"""Windows/s of TrajectoryDataset.sample(256, 20) on a 1M-step Minari dataset vs a per-sample loop.

    python bench/sampling.py [--episodes 2000] [--steps 500] [--rounds 5]

Writes a synthetic Meta-World-shaped dataset (39-dim observations, 4-dim actions) with
minari.create_dataset_from_buffers into a temp dir, loads it with load_trajectories, and times:
  value      eva-rl's vectorised sampler (two np.take gathers per batch from precomputed rows);
  reference  what a user writes over minari episodes, as the original Decision Transformer did:
             episodes read once into memory (MinariDataset iteration), returns-to-go precomputed
             per episode, then per sample: pick an episode in proportion to its length, pick a
             start, slice, normalise, left-pad, and stack the batch into tensors.
Also printed (not the reference, it is far slower): the same loop reading episodes from disk with
MinariDataset.sample_episodes for every batch.
Both produce the same dict of tensors. Medians over rounds, the two interleaved round by round
(the machine may be shared); the last line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

BATCH, CONTEXT, OBS_DIM, ACT_DIM, RETURN_SCALE = 256, 20, 39, 4, 1000.0


def write_dataset(root: Path, episodes: int, steps: int, seed: int = 0) -> Path:
    """A Minari dataset of `episodes` x `steps` random steps; returns its directory."""
    import minari
    from minari.data_collector import EpisodeBuffer

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    rng = np.random.default_rng(seed)
    buffers = [
        EpisodeBuffer(
            observations=rng.standard_normal((steps + 1, OBS_DIM), dtype=np.float32),
            actions=rng.uniform(-1, 1, (steps, ACT_DIM)).astype(np.float32),
            rewards=rng.uniform(0, 10, steps),
            terminations=np.zeros(steps, dtype=bool),
            truncations=np.arange(steps) == steps - 1,
            infos={"success": np.zeros(steps + 1, dtype=bool)},
        )
        for _ in range(episodes)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari nags about author/description metadata
        dataset = minari.create_dataset_from_buffers(
            "bench/sampling-v0",
            buffers,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32),
            action_space=gym.spaces.Box(-1, 1, (ACT_DIM,), np.float32),
        )
    return Path(dataset.storage.data_path).parent


def loop_batch(
    episodes: list, rtgs: list, weights: np.ndarray, rng: np.random.Generator, mean: np.ndarray, std: np.ndarray
) -> dict:
    """One batch the per-sample way (original DT's get_batch): a Python loop over samples.

    weights (E,): episode probabilities, proportional to length, computed once by the caller.
    """
    chosen = rng.choice(len(episodes), size=BATCH, p=weights)
    states, actions, rewards, returns, timesteps, masks = [], [], [], [], [], []
    for i in chosen:
        ep = episodes[i]
        start = rng.integers(0, len(ep.rewards))
        stop = min(start + CONTEXT, len(ep.rewards))
        pad = CONTEXT - (stop - start)
        obs = (ep.observations[start:stop] - mean) / std
        states.append(np.concatenate([np.zeros((pad, OBS_DIM), np.float32), obs]))
        actions.append(np.concatenate([np.zeros((pad, ACT_DIM), np.float32), ep.actions[start:stop]]))
        rewards.append(np.concatenate([np.zeros(pad, np.float32), ep.rewards[start:stop]]))
        returns.append(np.concatenate([np.zeros(pad, np.float32), rtgs[i][start:stop] / RETURN_SCALE]))
        timesteps.append(np.concatenate([np.zeros(pad, np.int64), np.arange(start, stop)]))
        masks.append(np.concatenate([np.zeros(pad, np.int64), np.ones(stop - start, np.int64)]))
    return {
        "states": torch.from_numpy(np.stack(states).astype(np.float32)),
        "actions": torch.from_numpy(np.stack(actions)),
        "rewards": torch.from_numpy(np.stack(rewards).astype(np.float32)[..., None]),
        "returns_to_go": torch.from_numpy(np.stack(returns).astype(np.float32)[..., None]),
        "timesteps": torch.from_numpy(np.stack(timesteps)),
        "attention_mask": torch.from_numpy(np.stack(masks)),
        "task_ids": torch.zeros(BATCH, dtype=torch.int64),  # one task here
    }


def batch_layout(batch: dict) -> dict:
    return {key: (tuple(value.shape), value.dtype) for key, value in batch.items()}


def length_weights(episodes: list) -> np.ndarray:
    lengths = np.array([len(ep.rewards) for ep in episodes], dtype=np.float64)
    return lengths / lengths.sum()


def windows_per_second(make_batch: Callable[[], dict], seconds: float) -> float:
    """Windows/s of one timing round: batches run back to back for about `seconds`."""
    batches, begin = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - begin) < seconds:
        make_batch()
        batches += 1
    return batches * BATCH / elapsed


def interleaved_medians(candidates: dict[str, Callable[[], dict]], rounds: int, seconds: float) -> dict[str, float]:
    """Median windows/s per candidate; every round times each candidate once, in turn, so the
    load of a shared machine changing over time hits all of them alike."""
    for make_batch in candidates.values():
        make_batch()  # warm-up: first-touch page faults, the sampler's tables, the allocator
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, make_batch in candidates.items():
            rates[name].append(windows_per_second(make_batch, seconds))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=500, help="steps per episode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per timing round")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        directory = write_dataset(Path(tmp), args.episodes, args.steps)
        print(f"wrote {args.episodes} x {args.steps} steps in {time.perf_counter() - begin:.1f} s")

        from eva_rl.data.trajectories import load_trajectories

        begin = time.perf_counter()
        data = load_trajectories(directory, return_scale=RETURN_SCALE)
        print(f"load_trajectories: {data.num_steps} steps in {time.perf_counter() - begin:.1f} s")
        rng = np.random.default_rng(0)

        import minari

        dataset = minari.MinariDataset(directory / "data")
        begin = time.perf_counter()
        episodes = list(dataset.iterate_episodes())
        rtgs = [np.cumsum(ep.rewards[::-1])[::-1].astype(np.float32) for ep in episodes]
        print(f"minari episodes into memory: {time.perf_counter() - begin:.1f} s")
        mean, std = data.state_mean, data.state_std
        weights = length_weights(episodes)
        rates = interleaved_medians(
            {
                "ours": lambda: data.sample(BATCH, CONTEXT, generator=rng),
                "reference": lambda: loop_batch(episodes, rtgs, weights, rng, mean, std),
            },
            args.rounds,
            args.seconds,
        )
        ours, reference = rates["ours"], rates["reference"]
        ours_layout = batch_layout(data.sample(BATCH, CONTEXT))
        loop_layout = batch_layout(loop_batch(episodes, rtgs, weights, rng, mean, std))
        assert ours_layout == loop_layout, (ours_layout, loop_layout)  # both sides build the same batch

        def from_disk() -> dict:
            sampled = dataset.sample_episodes(min(BATCH, len(dataset)))  # read from HDF5 every batch
            returns = [np.cumsum(ep.rewards[::-1])[::-1] for ep in sampled]
            return loop_batch(sampled, returns, length_weights(sampled), rng, mean, std)

        disk = interleaved_medians({"disk": from_disk}, max(1, args.rounds // 2), args.seconds)["disk"]

    print(f"eva-rl sample({BATCH}, {CONTEXT}):               {ours:12,.0f} windows/s")
    print(f"per-sample loop, episodes in memory:   {reference:12,.0f} windows/s  (reference)")
    print(f"per-sample loop, sample_episodes/disk: {disk:12,.0f} windows/s")
    print(f"ratio vs in-memory loop {ours / reference:.1f}x, vs on-disk loop {ours / disk:.1f}x")
    summary = {
        "bench": "sampling",
        "value": round(ours, 1),
        "unit": "windows/s",
        "reference": round(reference, 1),
        "ratio": round(ours / reference, 2),
        "target": 20,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
