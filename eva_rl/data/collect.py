"""Collect behaviour data into Minari datasets: scripted experts (+ action noise), SB3 models, random.

A dataset is written with Minari's `MinariStorage` (HDF5, no jax needed) into a temporary folder
next to its final one and swapped in by `storage.replace_dir`, so an interrupted or killed
collection never leaves a half-written dataset, nor loses the one it replaces. Collection is seeded: the env is built with
`seed`, the action noise and the random policy draw from generators seeded with `seed`, so the same
call twice writes identical arrays.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from eva_rl.storage import recover_dir, replace_dir, temp_dir_for
from eva_rl.envs import expert_policy, make_env, task_spec
from eva_rl.jobs import die_with_parent

NAMESPACE = "eva-rl"
SB3_ALGORITHMS = ("a2c", "ddpg", "dqn", "ppo", "sac", "td3")
DEFAULT_NOISE = 0.1  # action-noise sigma of the expert and SB3 policies unless one is given


@dataclass(frozen=True)
class CollectConfig:
    """What to collect for each task."""

    policy: str = "expert"  # "expert" | "random" | "sb3:PATH" | "sb3:PATH:ALGO"
    # std of Gaussian noise added to the policy's actions (then clipped); 0 = none;
    # None = 0.1 for the expert and SB3 models, none for random (uniform actions need no noise)
    noise: float | None = None
    episodes: int = 50  # episodes per task
    seed: int = 0  # seeds the env (goals, initial states), the noise and the random policy
    horizon: int | None = None  # steps per episode; None = the suite's horizon
    out: str | None = None  # root folder of the datasets; None = $MINARI_DATASETS_PATH or ~/.minari/datasets
    overwrite: bool = False  # replace a dataset that already exists (otherwise it is an error)
    workers: int = 1  # tasks collected in parallel processes

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}.")
        if self.noise is not None and (self.noise < 0 or not np.isfinite(self.noise)):
            raise ValueError(f"noise must be a finite sigma >= 0, got {self.noise}.")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be >= 1 step or None, got {self.horizon}.")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")
        kind = self.policy.split(":", 1)[0]
        if kind not in ("expert", "random", "sb3") or (kind == "sb3" and len(self.policy) <= 4):
            raise ValueError(
                f"policy must be 'expert', 'random' or 'sb3:PATH[:ALGO]', got {self.policy!r}."
            )

    @property
    def action_noise(self) -> float:
        """The noise sigma used: `noise`, or the policy's default when it is None."""
        if self.noise is not None:
            return float(self.noise)
        return 0.0 if self.policy == "random" else DEFAULT_NOISE


@dataclass(frozen=True)
class DatasetSummary:
    """What one collection wrote."""

    task: str
    dataset_id: str
    path: Path  # the dataset's folder (open it with minari.MinariDataset(path / "data"))
    episodes: int
    steps: int
    mean_return: float
    success_rate: float
    seconds: float

    def describe(self) -> str:
        return (
            f"{self.task}: {self.episodes} episodes, {self.steps} steps, mean return {self.mean_return:.1f}, "
            f"success {self.success_rate:.2f}, {self.steps / max(self.seconds, 1e-9):.0f} steps/s -> {self.path}"
        )


def policy_tag(policy: str, noise: float) -> str:
    """The part of a dataset's name that says how it was collected, e.g. "expert-noise0p5"."""
    kind = policy.split(":", 1)[0]
    tag = kind if kind != "sb3" else "sb3-" + re.sub(r"[^\w-]", "_", Path(policy.split(":")[1]).stem)
    # Minari ids allow letters, digits, "-" and "_" only: write 0.5 as "0p5".
    return f"{tag}-noise{noise:g}".replace(".", "p") if noise > 0 else tag


def dataset_id(task: str, policy: str, noise: float) -> str:
    """Minari id of a collected dataset: `eva-rl/<task>-<policy tag>-v0`."""
    return f"{NAMESPACE}/{task}-{policy_tag(policy, noise)}-v0"


def datasets_root(out: str | os.PathLike | None = None) -> Path:
    """Where datasets live: `out`, else $MINARI_DATASETS_PATH, else Minari's default."""
    if out is not None:
        return Path(out)
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def _refuse_existing(path: Path, overwrite: bool) -> None:
    recover_dir(path)  # a replacement a crash interrupted is settled first
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"Dataset {str(path)!r} already exists. Pass --overwrite to replace it, or use another --out."
        )


def _sb3_algorithm(path: Path) -> str:
    """The SB3 algorithm that saved `path`, read with SB3's own loader.

    SB3 does not record the algorithm's name in a model file (`BaseAlgorithm.load` is called on
    the class you already know), so it is inferred from the saved attributes: off-policy algorithms
    keep their policies in their own module (sac, td3, dqn; DDPG reuses TD3's and loads as TD3 for
    prediction); PPO and A2C share ActorCriticPolicy, so they are told apart by PPO's clipping range.
    """
    from stable_baselines3.common.save_util import load_from_zip_file

    try:
        data, _, _ = load_from_zip_file(path, device="cpu", print_system_info=False)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a Stable-Baselines3 model file ({exc}). Give the .zip written by model.save()."
        ) from None
    data = data or {}
    module = getattr(data.get("policy_class"), "__module__", "")
    for name in ("sac", "td3", "dqn"):
        if f".{name}." in f".{module}.":
            return name
    if "clip_range" in data:
        return "ppo"
    if "gae_lambda" in data:
        return "a2c"
    raise ValueError(
        f"Cannot tell which SB3 algorithm saved {path} (policy module {module!r}). "
        f"Name it: --policy sb3:{path}:ALGO with ALGO one of {SB3_ALGORITHMS}."
    )


def _sb3_policy(spec: str, observation_space: gym.spaces.Space | None,
                action_space: gym.spaces.Space) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic policy of an SB3 model file, checked against the task's spaces."""
    import stable_baselines3

    parts = spec.split(":")
    path = Path(parts[1])
    if not path.is_file():
        raise FileNotFoundError(f"SB3 model file {str(path)!r} does not exist. Give the .zip written by model.save().")
    algo = parts[2].lower() if len(parts) > 2 else _sb3_algorithm(path)
    if algo not in SB3_ALGORITHMS:
        raise ValueError(f"Unknown SB3 algorithm {algo!r}; expected one of {SB3_ALGORITHMS}.")
    try:
        model = getattr(stable_baselines3, algo.upper()).load(path, device="cpu")
    except Exception as exc:  # SB3 fails deep inside torch/pickle when the file or the algorithm is wrong
        raise ValueError(
            f"Cannot load {path} as an SB3 {algo.upper()} model ({type(exc).__name__}: {exc}). "
            f"Name the algorithm that saved it: --policy sb3:{path}:ALGO, ALGO one of {SB3_ALGORITHMS}."
        ) from None
    expected = {"observation": observation_space, "action": action_space}
    for name, theirs in (("observation", model.observation_space), ("action", model.action_space)):
        ours = expected[name]
        if ours is not None and getattr(theirs, "shape", None) != ours.shape:
            raise ValueError(
                f"SB3 model {path} was trained with {name} space {theirs}, but the task's is {ours}. "
                "Collect with a model trained on this task."
            )

    def act(observation: np.ndarray) -> np.ndarray:
        action, _ = model.predict(observation, deterministic=True)
        return np.asarray(action, dtype=np.float32)

    return act


def behaviour_policy(policy: str, task: str, action_space: gym.spaces.Box, noise: float, seed: int, *,
                     observation_space: gym.spaces.Box | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function obs (obs_dim,) -> action (act_dim,): the named policy, plus clipped Gaussian noise.

    observation_space, when given, is checked against an SB3 model's.
    """
    rng = np.random.default_rng(seed)
    low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
    kind = policy.split(":", 1)[0]
    if kind == "expert":
        base = expert_policy(task)
    elif kind == "random":
        def base(observation: np.ndarray) -> np.ndarray:
            return rng.uniform(low, high).astype(np.float32)
    else:
        base = _sb3_policy(policy, observation_space, action_space)
    if noise == 0:
        return base

    def noisy(observation: np.ndarray) -> np.ndarray:
        action = base(observation) + noise * rng.standard_normal(low.shape).astype(np.float32)
        return np.clip(action, low, high)

    return noisy


def collect_episodes(task: str, config: CollectConfig, env: gym.Env | None = None) -> list[dict[str, np.ndarray]]:
    """Roll out the behaviour policy for `config.episodes` episodes of `task`.

    `env` (optional) is a fresh `make_env(task, config.seed, horizon=config.horizon)`, for callers
    that also need its spaces (building a Meta-World env costs a second); the caller closes it.

    Each episode: observations (T+1, obs_dim) float32 (the last one after the final step),
    actions (T, act_dim) float32, rewards (T,) float64, terminations (T,) bool, truncations (T,) bool,
    success (T+1,) bool (index 0 is the reset, always False).
    """
    owned = env is None
    env = make_env(task, config.seed, horizon=config.horizon) if owned else env
    try:
        with _one_torch_thread() if config.policy.startswith("sb3:") else contextlib.nullcontext():
            return _roll_out(env, task, config)
    finally:
        if owned:
            env.close()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread for the block, then as it was.

    An SB3 policy acts on one observation at a time: products that small gain nothing from more
    threads, and beside other busy processes torch's default pool of all cores made them 20x
    slower (measured on a 2-core machine: 1,000 HalfCheetah steps in 14 s, 0.7 s with one thread).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _roll_out(env: gym.Env, task: str, config: CollectConfig) -> list[dict[str, np.ndarray]]:
    act = behaviour_policy(config.policy, task, env.action_space, config.action_noise, config.seed,
                           observation_space=env.observation_space)
    episodes = []
    for _ in range(config.episodes):
        observation, _ = env.reset()
        observations, actions, rewards, terminations, truncations, success = [observation], [], [], [], [], [False]
        while True:
            action = act(observation)
            observation, reward, terminated, truncated, info = env.step(action)
            observations.append(observation)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            success.append(info["success"])
            if terminated or truncated:
                break
        episodes.append({  # one episode, in the shapes of the docstring
            "observations": np.asarray(observations, dtype=np.float32),
            "actions": np.asarray(actions, dtype=np.float32),
            "rewards": np.asarray(rewards, dtype=np.float64),
            "terminations": np.asarray(terminations, dtype=bool),
            "truncations": np.asarray(truncations, dtype=bool),
            "success": np.asarray(success, dtype=bool),
        })
    return episodes


def write_dataset(episodes: Sequence[dict[str, np.ndarray]], dataset_id: str, root: Path,
                  observation_space: gym.spaces.Space, action_space: gym.spaces.Space,
                  metadata: dict, *, overwrite: bool = False, ref_min_score: float | None = None,
                  ref_max_score: float | None = None) -> Path:
    """Write `episodes` as the Minari dataset `dataset_id` under `root`, atomically; returns its folder.

    The folder is `root/<dataset_id>` with Minari's layout (`data/metadata.json`,
    `data/main_data.hdf5`). `minari.create_dataset_from_buffers` can only write under the
    process-wide $MINARI_DATASETS_PATH, so the dataset is written with the storage class it uses
    (`MinariStorage.new`, which takes a path), with the metadata fields it would write.
    """
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    final = root / dataset_id
    _refuse_existing(final, overwrite)
    buffers = [
        EpisodeBuffer(id=i, observations=ep["observations"], actions=ep["actions"], rewards=ep["rewards"],
                      terminations=ep["terminations"], truncations=ep["truncations"],
                      infos={"success": ep["success"]})
        for i, ep in enumerate(episodes)
    ]
    staging = temp_dir_for(final)
    try:
        storage = MinariStorage.new(staging / "data", observation_space=observation_space, action_space=action_space)
        info = {
            "dataset_id": dataset_id, "minari_version": minari.__version__, "author": {"eva-rl"},
            "algorithm_name": str(metadata.get("eva_rl_policy")),
            "description": f"{metadata.get('eva_rl_task')}: {metadata.get('eva_rl_policy')} "
                           f"(noise {metadata.get('eva_rl_noise')}), collected by eva-rl",
            **metadata,
        }
        if ref_min_score is not None and ref_max_score is not None:
            info.update(ref_min_score=float(ref_min_score), ref_max_score=float(ref_max_score))
        storage.update_metadata(info)
        storage.update_episodes(buffers)
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def collect_task(task: str, config: CollectConfig) -> DatasetSummary:
    """Collect `config.episodes` episodes of `task` and write them as one Minari dataset."""
    spec = task_spec(task)
    root = datasets_root(config.out)
    name = dataset_id(task, config.policy, config.action_noise)
    _refuse_existing(root / name, config.overwrite)
    env = make_env(task, config.seed, horizon=config.horizon)
    try:
        start = time.perf_counter()
        episodes = collect_episodes(task, config, env)
        seconds = time.perf_counter() - start
    finally:
        env.close()
    returns = np.array([ep["rewards"].sum() for ep in episodes])
    success = np.array([ep["success"].any() for ep in episodes])
    steps = int(sum(len(ep["rewards"]) for ep in episodes))
    metadata = {
        "eva_rl_task": task, "eva_rl_policy": config.policy, "eva_rl_noise": config.action_noise,
        "eva_rl_seed": int(config.seed), "eva_rl_episodes": int(config.episodes),
        "eva_rl_horizon": int(config.horizon or spec.horizon),
        "eva_rl_mean_return": float(returns.mean()), "eva_rl_success_rate": float(success.mean()),
    }
    path = write_dataset(episodes, name, root, env.observation_space, env.action_space, metadata,
                         overwrite=config.overwrite, ref_min_score=spec.ref_min_score,
                         ref_max_score=spec.ref_max_score)
    return DatasetSummary(task=task, dataset_id=name, path=path, episodes=len(episodes), steps=steps,
                          mean_return=float(returns.mean()), success_rate=float(success.mean()), seconds=seconds)


def _collect_task_star(args: tuple[str, CollectConfig]) -> DatasetSummary:
    return collect_task(*args)


def collect_tasks(tasks: Sequence[str], config: CollectConfig, *, progress: bool = True) -> Iterator[DatasetSummary]:
    """Collect every task in `tasks` (one dataset each), yielding summaries as they finish.

    Bad task names and datasets that exist already (without `config.overwrite`) raise here, at
    the call, before any task is collected. With `config.workers > 1` tasks run in parallel
    processes; each task's data does not depend on the worker it ran in, so results are identical.
    """
    tasks = list(tasks)
    for task in tasks:
        task_spec(task)
    root = datasets_root(config.out)
    for task in tasks:
        _refuse_existing(root / dataset_id(task, config.policy, config.action_noise), config.overwrite)
    return _collect_each(tasks, config, progress)


def _collect_each(tasks: list[str], config: CollectConfig, progress: bool) -> Iterator[DatasetSummary]:
    bar = tqdm(total=len(tasks), unit="task", desc="collect", disable=not progress)
    try:
        if config.workers == 1 or len(tasks) == 1:
            for task in tasks:
                bar.set_postfix_str(task)
                summary = collect_task(task, config)
                bar.update(1)
                yield summary
        else:
            # spawn: MuJoCo and torch state must not be forked into workers.
            with mp.get_context("spawn").Pool(min(config.workers, len(tasks)), initializer=die_with_parent) as pool:
                for summary in pool.imap(_collect_task_star, [(task, config) for task in tasks]):
                    bar.update(1)
                    yield summary
    finally:
        bar.close()
