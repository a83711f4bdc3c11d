"""Vectorised evaluation: rollouts of a policy (or a reference agent) and their aggregates.

Protocol (the same for every agent, so numbers compare):

- per task, `episodes` episodes run on `num_envs` Gymnasium vector sub-envs; env i is built by
  `eva_rl.envs.make_env(task, seed + i)` (through `make_vector_env`) and runs `(episodes + i) // num_envs` episodes (the
  split is even, so envs with short episodes are not over-represented), one after another;
  the k-th episode of env i therefore starts from the same state for every agent and run;
- autoreset is disabled: an env whose episode ended is reset explicitly, so no reset step is
  ever stepped or counted;
- `asynchronous=True` steps the envs in worker processes, in two groups pipelined with the
  policy (one group steps while the actions of the other are computed); every env sees the
  same actions as in the synchronous loop to float32 rounding (bit for bit on AVX2; on AVX-512
  the BLAS rounds some row counts differently, and a long episode may then part ways), and each
  mode by itself gives the same episodes on every run;
- the Decision Transformer is conditioned on a per-task target return (default: the metadata's,
  the best return in the task's training data), decremented by each reward;
- an episode succeeds if `info["success"]` was true at any of its steps.

Aggregates (per task and over the suite, for success, return and length) come from
`summarize(values)`: mean, standard error, interquartile mean, seeded bootstrap 95% CI (`eva_rl.stats`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np

import eva_rl
from eva_rl import stats
from eva_rl.storage import write_text_atomic
from eva_rl.envs import (SubprocessVectorEnv, space_shapes, expert_policy, make_vector_env, normalized_score,
                         resolve_tasks)
from eva_rl.policy import DecisionTransformerPolicy, PolicyMetadata, load_policy  # noqa: F401 (load_policy: also eva_rl.evaluate's)
from eva_rl.video import Video, render_size, select_gl_backend

REFERENCE_KINDS = ("expert", "random")
eva_rl._make_callable(__name__)  # so that eva_rl.evaluate(...) calls evaluate() below
_MEASURES = ("success", "return", "length")


# ------------------------------------------------------------------------------------------------
# Aggregates
# ------------------------------------------------------------------------------------------------

def summarize(values: Sequence[float] | np.ndarray, *, n_bootstrap: int = 2000, seed: int = 0) -> dict[str, float]:
    """mean, stderr (`eva_rl.stats.mean_stderr`: sample std / sqrt(n), NaN for one value), iqm, and
    the percentile bootstrap 95% CI of the mean (`n_bootstrap` resamples seeded with `seed`), n."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("summarize needs at least one value, got none.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"summarize got non-finite values: {x[~np.isfinite(x)][:5].tolist()}.")
    summary = stats.mean_stderr(x)
    low, high = stats.stratified_bootstrap_ci([x], lambda s: s.mean(axis=1), n_bootstrap=n_bootstrap, seed=seed)
    return {"mean": summary.mean, "stderr": summary.stderr, "iqm": stats.iqm(x),
            "ci95_low": low, "ci95_high": high, "n": summary.n}


@dataclass(frozen=True)
class EpisodeRecord:
    """One evaluation episode."""

    task: str  # task name
    episode: int  # index within the task, env-major: env 0's episodes first
    env: int  # sub-env index i (seeded seed + i)
    seed: int  # the sub-env's seed (seed + i)
    episode_return: float  # undiscounted sum of rewards
    length: int  # steps taken
    success: bool  # info["success"] at any step

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "episode": self.episode, "env": self.env, "seed": self.seed,
                "return": self.episode_return, "length": self.length, "success": self.success}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EpisodeRecord":
        return cls(task=str(data["task"]), episode=int(data["episode"]), env=int(data["env"]), seed=int(data["seed"]),
                   episode_return=float(data["return"]), length=int(data["length"]), success=bool(data["success"]))


def aggregate(episodes: Sequence[EpisodeRecord], *, seed: int = 0) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-task and suite summaries {measure: summarize(...)} for success (0/1), return and length,
    and "score" (D4RL's normalised return, `envs.normalized_score`) where every task has references.

    The suite pools all episodes; every task has the same number of episodes, so its mean is
    also the mean of the per-task means."""
    if not episodes:
        raise ValueError("No episodes to aggregate.")

    def measures(records: Sequence[EpisodeRecord]) -> dict[str, dict]:
        columns = {"success": [float(r.success) for r in records], "return": [r.episode_return for r in records],
                   "length": [float(r.length) for r in records]}
        found = {name: summarize(columns[name], seed=seed) for name in _MEASURES}
        scores = [normalized_score(r.task, r.episode_return) for r in records]
        if all(score is not None for score in scores):
            found["score"] = summarize(scores, seed=seed)
        return found

    tasks = list(dict.fromkeys(r.task for r in episodes))
    per_task = {task: measures([r for r in episodes if r.task == task]) for task in tasks}
    return per_task, measures(episodes)


@dataclass
class EvalResult:
    """Episodes of one evaluation and their aggregates (see `aggregate`)."""

    episodes: list[EpisodeRecord]
    tasks: dict[str, dict[str, dict[str, float]]]  # task -> measure -> summary
    suite: dict[str, dict[str, float]]  # measure -> summary over all episodes
    settings: dict[str, Any] = field(default_factory=dict)  # agent, seed, episodes, num_envs, targets, ...
    env_steps: int = 0  # steps taken in all envs (episodes' steps only)
    seconds: float = 0.0  # wall-clock time of the rollouts (acting and stepping, not building the envs)
    build_seconds: float = 0.0  # wall-clock time spent building and closing the envs
    cpu_seconds: float = 0.0  # CPU time of this process during the rollouts
    worker_cpu_seconds: float = 0.0  # CPU time of the env worker processes during the rollouts (asynchronous)

    @property
    def success_rate(self) -> float:
        return float(self.suite["success"]["mean"])

    @property
    def return_mean(self) -> float:
        return float(self.suite["return"]["mean"])

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "suite": self.suite, "tasks": self.tasks, "env_steps": self.env_steps,
                "seconds": self.seconds, "build_seconds": self.build_seconds, "cpu_seconds": self.cpu_seconds,
                "worker_cpu_seconds": self.worker_cpu_seconds,
                "episodes": [r.to_dict() for r in self.episodes]}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write everything as JSON, atomically (temporary file + rename)."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EvalResult":
        data = json.loads(Path(path).read_text())
        return cls(episodes=[EpisodeRecord.from_dict(r) for r in data["episodes"]], tasks=data["tasks"],
                   suite=data["suite"], settings=data.get("settings", {}), env_steps=int(data.get("env_steps", 0)),
                   seconds=float(data.get("seconds", 0.0)), build_seconds=float(data.get("build_seconds", 0.0)),
                   cpu_seconds=float(data.get("cpu_seconds", 0.0)),
                   worker_cpu_seconds=float(data.get("worker_cpu_seconds", 0.0)))

    def describe(self) -> str:
        """A plain-text table: one row per task, then the suite."""
        scored = "score" in self.suite  # D4RL's normalised score, where the tasks have references
        rows = [("task", "episodes", "success", "return (mean +- se)", "return IQM", "length")
                + (("normalised score",) if scored else ())]
        for name, m in [*self.tasks.items(), ("suite", self.suite)]:
            rows.append((name, str(m["success"]["n"]),
                         f"{m['success']['mean']:.3f} +- {m['success']['stderr']:.3f}",
                         f"{m['return']['mean']:.1f} +- {m['return']['stderr']:.1f}",
                         f"{m['return']['iqm']:.1f}", f"{m['length']['mean']:.0f}")
                        + ((f"{m['score']['mean']:.1f} +- {m['score']['stderr']:.1f}",) if scored else ()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


# ------------------------------------------------------------------------------------------------
# Agents: what acts in the rollout loop
# ------------------------------------------------------------------------------------------------

class _Agent:
    """Acts for a subset of envs; told about steps and episode starts (rows follow env_ids)."""

    def start(self, task: str, num_envs: int, action_space: Any) -> None: ...
    def act(self, obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray: ...
    def step(self, actions: np.ndarray, rewards: np.ndarray, env_ids: np.ndarray) -> None: ...
    def reset(self, env_ids: np.ndarray) -> None: ...


class _PolicyAgent(_Agent):
    def __init__(self, policy: DecisionTransformerPolicy, target_returns: Mapping[str, float], bf16: bool) -> None:
        self.policy, self.target_returns, self.bf16 = policy, target_returns, bf16

    def start(self, task: str, num_envs: int, action_space: Any) -> None:
        self.target = self.target_returns[task]
        self.ctx = self.policy.start_rollout(num_envs, self.target, bf16=self.bf16)

    def act(self, obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        return self.policy.act(self.ctx, obs, env_ids)  # all envs in order -> views, no gathers

    def step(self, actions: np.ndarray, rewards: np.ndarray, env_ids: np.ndarray) -> None:
        self.ctx.step(actions, rewards, env_ids)

    def reset(self, env_ids: np.ndarray) -> None:
        self.ctx.reset(env_ids, self.target)


class _ExpertAgent(_Agent):
    def start(self, task: str, num_envs: int, action_space: Any) -> None:
        self.expert = expert_policy(task)

    def act(self, obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        return np.stack([self.expert(row) for row in obs])


class _RandomAgent(_Agent):
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def start(self, task: str, num_envs: int, action_space: Any) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.low, self.high = action_space.low, action_space.high

    def act(self, obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.low, self.high, size=(len(env_ids), self.low.shape[0])).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------

def evaluate(policy: DecisionTransformerPolicy, tasks: str | Sequence[str], episodes: int, seed: int, *,
             num_envs: int = 8, target_returns: float | Mapping[str, float] | None = None,
             horizon: int | None = None, asynchronous: bool = False, bf16: bool = False,
             video_dir: str | os.PathLike | None = None, video_every: int = 4,
             progress: bool = False) -> EvalResult:
    """Roll `policy` out for `episodes` episodes per task (tasks or suite names), seeded `seed`.

    target_returns: RAW return to condition on: one number for all tasks, or {task: value}
    (missing tasks fall back to the policy metadata's). horizon: steps per episode (default: the
    suite's). asynchronous: step the envs in worker processes while the policy acts (same
    episodes; faster where a second core is free). bf16: bfloat16 inference (fast on GPUs and
    AVX512-BF16/AMX CPUs only). video_dir: write the first episode of each task as `<task>.mp4`,
    keeping every `video_every`-th frame. The policy is put in eval mode and left there.
    """
    task_list = resolve_tasks(tasks)
    targets = _resolve_targets(policy, task_list, target_returns)
    _check_policy_inputs(policy, task_list, target_returns)
    policy.eval()
    settings = {"agent": "policy", "target_returns": targets, "bf16": bool(bf16)}
    return _run(_PolicyAgent(policy, targets, bf16), task_list, episodes, seed, num_envs=num_envs, horizon=horizon,
                asynchronous=asynchronous, video_dir=video_dir, video_every=video_every, progress=progress,
                settings=settings, check_spaces=policy.check_env)


def evaluate_reference(kind: str, tasks: str | Sequence[str], episodes: int, seed: int, *, num_envs: int = 8,
                       horizon: int | None = None, asynchronous: bool = False,
                       video_dir: str | os.PathLike | None = None, video_every: int = 4,
                       progress: bool = False) -> EvalResult:
    """The same protocol as `evaluate` for a reference agent: "expert" (Meta-World's scripted
    policy of each task) or "random" (uniform actions, seeded with `seed`)."""
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"Unknown reference agent {kind!r}; choose one of {list(REFERENCE_KINDS)}.")
    task_list = resolve_tasks(tasks)
    if kind == "expert":
        for task in task_list:
            expert_policy(task)  # fail before any env is built when a task has no expert
    agent = _ExpertAgent() if kind == "expert" else _RandomAgent(seed)
    return _run(agent, task_list, episodes, seed, num_envs=num_envs, horizon=horizon, asynchronous=asynchronous,
                video_dir=video_dir, video_every=video_every, progress=progress, settings={"agent": kind})


def _check_policy_inputs(policy: DecisionTransformerPolicy, tasks: Sequence[str],
                         target_returns: float | Mapping[str, float] | None) -> None:
    """Errors a user can cause, before any env is built or any episode is run."""
    if isinstance(target_returns, Mapping):
        unknown = sorted(set(target_returns) - set(tasks))
        if unknown:
            raise ValueError(f"Target returns name {unknown}, which are not evaluated here (tasks: {list(tasks)}); "
                             f"fix the task name in --target-return TASK=VALUE, or evaluate that task.")
    for task in tasks:  # the spaces, from envs' cache: building a Meta-World env costs a second
        obs_shape, act_shape = space_shapes(task)
        policy.check_env(task, _Shape(obs_shape), _Shape(act_shape))


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]  # what check_env reads of a Gymnasium space


def _resolve_targets(policy: DecisionTransformerPolicy, tasks: Sequence[str],
                     target_returns: float | Mapping[str, float] | None) -> dict[str, float]:
    given: Mapping[str, float]
    if target_returns is None:
        given = {}
    elif isinstance(target_returns, Mapping):
        given = target_returns
    else:
        given = {task: float(target_returns) for task in tasks}
    targets = {}
    for task in tasks:
        value = given.get(task, policy.metadata.target_returns.get(task))
        if value is None:
            raise ValueError(
                f"No target return for task {task!r}: the policy's metadata has targets for "
                f"{sorted(policy.metadata.target_returns)}. Pass target_returns={{{task!r}: value}} "
                f"(--target-return {task}=VALUE)."
            )
        if not math.isfinite(float(value)):
            raise ValueError(f"Target return for {task!r} must be finite, got {value!r}.")
        targets[task] = float(value)
    return targets


def _run(agent: _Agent, tasks: Sequence[str], episodes: int, seed: int, *, num_envs: int, horizon: int | None,
         asynchronous: bool, video_dir: str | os.PathLike | None, video_every: int, progress: bool,
         settings: dict[str, Any], check_spaces: Callable[..., None] | None = None) -> EvalResult:
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be a positive integer (per task), got {episodes!r}.")
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}.")
    if video_every < 1:
        raise ValueError(f"video_every must be >= 1, got {video_every}.")
    n_envs = min(num_envs, episodes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes * len(tasks), desc="evaluate", unit="episode")
    records: list[EpisodeRecord] = []
    env_steps, rollout_seconds, cpu_seconds, worker_cpu_seconds = 0, 0.0, 0.0, 0.0
    start = time.perf_counter()
    try:
        for task in tasks:
            task_records, steps, seconds, cpu, worker_cpu = _rollout_task(
                agent, task, episodes, seed, n_envs, horizon=horizon, asynchronous=asynchronous,
                video_path=Path(video_dir) / f"{task}.mp4" if video_dir is not None else None,
                video_every=video_every, check_spaces=check_spaces, bar=bar)
            records.extend(task_records)
            env_steps += steps
            rollout_seconds += seconds
            cpu_seconds += cpu
            worker_cpu_seconds += worker_cpu
    finally:
        if bar is not None:
            bar.close()
    total_seconds = time.perf_counter() - start
    per_task, suite = aggregate(records, seed=seed)
    settings = {**settings, "tasks": list(tasks), "episodes": episodes, "seed": seed, "num_envs": n_envs,
                "horizon": horizon, "asynchronous": asynchronous}
    return EvalResult(episodes=records, tasks=per_task, suite=suite, settings=settings, env_steps=env_steps,
                      seconds=rollout_seconds, build_seconds=total_seconds - rollout_seconds,
                      cpu_seconds=cpu_seconds, worker_cpu_seconds=worker_cpu_seconds)


class _EnvGroup:
    """A vector env over the task's envs `offset .. offset + num_envs - 1`, with the observations
    its envs show now. `send` steps it; `receive` returns that step's results. Synchronous, the
    step happens in `send`; asynchronous (`SubprocessVectorEnv`), the envs step in their worker
    process between the two calls, while this process acts for the other group."""

    def __init__(self, envs: Any, offset: int) -> None:
        self.envs = envs
        self.offset = offset
        self.ids = offset + np.arange(envs.num_envs)  # global env indices
        self.obs: np.ndarray | None = None  # (num_envs, obs_dim)
        self.sent_ids = np.zeros(0, dtype=np.int64)  # global ids of the envs that acted in the step in flight
        self.sent_actions: np.ndarray | None = None  # (num_envs, act_dim) the step's actions, idle ones included
        self._result: tuple | None = None
        self.pending = False

    def send(self, actions: np.ndarray, ids: np.ndarray) -> None:
        self.sent_ids, self.sent_actions, self.pending = ids, actions, True
        if isinstance(self.envs, SubprocessVectorEnv):
            self.envs.step_async(actions)
        else:
            self._result = self.envs.step(actions)

    def receive(self) -> tuple:
        self.pending = False
        result = self.envs.step_wait() if isinstance(self.envs, SubprocessVectorEnv) else self._result
        self._result = None
        return result


def _env_groups(task: str, seed: int, n_envs: int, *, horizon: int | None, asynchronous: bool,
                render: bool) -> list[_EnvGroup]:
    """One synchronous group of all `n_envs` envs; asynchronous (and not recording), two groups,
    each stepped in one worker process (env i still seeded seed + i), pipelined: while one
    group's envs step, this process computes the other group's actions (two cores: the policy
    on one, the simulators on the other). Recording needs env 0 in this process."""
    kwargs: dict[str, Any] = dict(horizon=horizon, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    if render:
        first = {"render_mode": "rgb_array", **render_size(task)}
        return [_EnvGroup(make_vector_env([task], n_envs, seed, first_env_kwargs=first, **kwargs), 0)]
    if not asynchronous or n_envs == 1:
        return [_EnvGroup(make_vector_env([task], n_envs, seed, **kwargs), 0)]
    half = (n_envs + 1) // 2
    groups = []
    try:
        for offset, size in ((0, half), (half, n_envs - half)):
            groups.append(_EnvGroup(SubprocessVectorEnv([task], size, seed + offset, **kwargs), offset))
    except BaseException:
        for group in groups:
            group.envs.close()
        raise
    return groups


class _Tally:
    """Per-env bookkeeping of one task's episodes: the even split, the running episodes, the finished ones."""

    def __init__(self, episodes: int, n_envs: int) -> None:
        self.quota = np.array([(episodes + i) // n_envs for i in range(n_envs)])  # even split, sums to `episodes`
        self.done_count = np.zeros(n_envs, dtype=np.int64)
        self.ep_return = np.zeros(n_envs, dtype=np.float64)
        self.ep_length = np.zeros(n_envs, dtype=np.int64)
        self.ep_success = np.zeros(n_envs, dtype=bool)
        self.finished: dict[tuple[int, int], tuple[float, int, bool]] = {}  # (env, k-th episode) -> result
        self.env_steps = 0  # steps of counted episodes only

    @property
    def active(self) -> np.ndarray:
        """(n_envs,) True where an env still has episodes to run."""
        return self.done_count < self.quota

    def add_step(self, ids: np.ndarray, rewards: np.ndarray, success: np.ndarray) -> None:
        self.ep_return[ids] += rewards
        self.ep_length[ids] += 1
        self.ep_success[ids] |= success
        self.env_steps += len(ids)

    def finish(self, ids: np.ndarray) -> None:
        for i in ids:
            self.finished[(i, int(self.done_count[i]))] = (float(self.ep_return[i]), int(self.ep_length[i]),
                                                          bool(self.ep_success[i]))
            self.done_count[i] += 1
            self.ep_return[i], self.ep_length[i], self.ep_success[i] = 0.0, 0, False

    def records(self, task: str, seed: int) -> list[EpisodeRecord]:
        """Every episode, env-major (env 0's episodes first)."""
        records = []
        for i in range(len(self.quota)):
            for k in range(int(self.quota[i])):
                ret, length, success = self.finished[(i, k)]
                records.append(EpisodeRecord(task=task, episode=len(records), env=i, seed=seed + i,
                                             episode_return=ret, length=length, success=success))
        return records


def _rollout_task(agent: _Agent, task: str, episodes: int, seed: int, n_envs: int, *, horizon: int | None,
                  asynchronous: bool, video_path: Path | None, video_every: int,
                  check_spaces: Callable[..., None] | None,
                  bar: Any) -> tuple[list[EpisodeRecord], int, float, float, float]:
    """All `episodes` episodes of one task: their records (env-major order), the steps taken, and
    the wall-clock, CPU and env-worker CPU seconds spent rolling out (first reset to last step)."""
    if video_path is not None:
        select_gl_backend()
    groups = _env_groups(task, seed, n_envs, horizon=horizon, asynchronous=asynchronous,
                         render=video_path is not None)
    try:
        envs = groups[0].envs
        obs_space, act_space = envs.single_observation_space, envs.single_action_space
        if check_spaces is not None:
            check_spaces(task, obs_space, act_space)
        agent.start(task, n_envs, act_space)
        tally = _Tally(episodes, n_envs)
        start, start_cpu, start_workers = time.perf_counter(), time.process_time(), _worker_cpu_seconds(groups)
        for group in groups:
            group.obs, _ = group.envs.reset()
        video = Video(video_path, envs.envs[0], task, video_every) if video_path is not None else None
        # Each pass acts for every group in turn; a group's previous step is collected just before
        # it acts again, so with two asynchronous groups one steps while the other's actions are computed.
        while True:
            for group in groups:
                if group.pending:
                    _collect(group, agent, tally, video, bar)
                _act(group, agent, tally, act_space)
            if not any(group.pending for group in groups):
                break
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        worker_cpu_seconds = _worker_cpu_seconds(groups) - start_workers
    finally:
        for group in groups:
            group.envs.close()
    return tally.records(task, seed), tally.env_steps, seconds, cpu_seconds, worker_cpu_seconds


def _worker_cpu_seconds(groups: Sequence[_EnvGroup]) -> float:
    return sum(group.envs.cpu_seconds() for group in groups if isinstance(group.envs, SubprocessVectorEnv))


def _act(group: _EnvGroup, agent: _Agent, tally: _Tally, act_space: Any) -> None:
    """Act for the group's envs that still have episodes to run and send the step off. Envs that
    met their quota step too (a vector env steps all) with an idle action whose results are ignored."""
    ids = group.ids[tally.active[group.ids]]
    if not len(ids):
        return
    act_dim = act_space.shape[0]
    low, high = act_space.low.astype(np.float32), act_space.high.astype(np.float32)
    actions = np.tile(np.clip(np.zeros(act_dim, dtype=np.float32), low, high), (len(group.ids), 1))
    rows = ids - group.offset
    actions[rows] = np.clip(agent.act(group.obs[rows], ids)[:, :act_dim], low, high)
    group.send(actions, ids)


def _collect(group: _EnvGroup, agent: _Agent, tally: _Tally, video: "Video | None", bar: Any) -> None:
    """Take in the results of the group's step: tally them, end episodes, reset the ended envs."""
    obs, rewards, terminated, truncated, info = group.receive()
    ids, rows = group.sent_ids, group.sent_ids - group.offset
    agent.step(group.sent_actions[rows], rewards[rows], ids)
    tally.add_step(ids, rewards[rows], _info_flags(info, "success", len(group.ids))[rows])
    done = terminated | truncated  # (group size,)
    if video is not None and video.frames is not None and 0 in ids:
        video.after_step(int(tally.ep_length[0]), ended=bool(done[0]))
    ended = ids[done[rows]]
    tally.finish(ended)
    if bar is not None and len(ended):
        bar.update(len(ended))
    # An env is reset only if its group steps again (an env past its quota idles until the others finish);
    # the group's last step resets nothing (nothing would use that observation).
    if done.any() and tally.active[group.ids].any():
        reset_obs, _ = group.envs.reset(options={"reset_mask": done.copy()})
        obs = np.where(done[:, None], reset_obs, obs)
        restart = group.ids[done & tally.active[group.ids]]
        if len(restart):
            agent.reset(restart)
    group.obs = obs


def _info_flags(info: Mapping[str, Any], key: str, n_envs: int) -> np.ndarray:
    """The boolean `info[key]` of every sub-env (False where an env did not report it)."""
    if key not in info:
        return np.zeros(n_envs, dtype=bool)
    values = np.asarray(info[key]).astype(bool)
    present = np.asarray(info.get(f"_{key}", np.ones(n_envs, dtype=bool)), dtype=bool)
    return values & present


@dataclass(frozen=True)
class EvaluateConfig:
    """What `eva-rl evaluate` evaluates and how (YAML + dotted overrides; every flag sets one key)."""

    # Checkpoint, plain DT or adapter directory to evaluate; None when `reference` is set.
    model_dir: str | None = None
    # Task or suite names; empty = the tasks the policy was trained on.
    tasks: tuple[str, ...] = ()
    # Evaluate a reference agent instead of a model: "expert" or "random"; None = the model.
    reference: str | None = None
    # Episodes per task.
    episodes: int = 10
    # Env i of a task is seeded seed + i.
    seed: int = 0
    # Envs stepped together per task.
    num_envs: int = 8
    # Steps per episode; None = the suite's horizon.
    horizon: int | None = None
    # Raw target return for every task; None = the one the checkpoint recorded per task.
    target_return: float | None = None
    # Raw target return per task (task -> value); wins over target_return for the tasks it names.
    target_returns: dict[str, float] = field(default_factory=dict)
    # Minari dataset ids or folders whose best episode return becomes each of their tasks' target
    # (what fine-tuning uses); target_return and target_returns win over it.
    target_return_from: tuple[str, ...] = ()
    # Write the episodes and aggregates to this JSON file; None = no file.
    json_out: str | None = None
    # Record each task's first episode as <video_dir>/<task>.mp4; None = no video.
    video_dir: str | None = None
    # Keep every N-th frame of the video.
    video_every: int = 4
    # bfloat16 inference.
    bf16: bool = False
    # One process per env (Gymnasium's AsyncVectorEnv) instead of stepping them in this process.
    asynchronous: bool = False
    # Pretrained checkpoint an adapter model_dir applies to; None = the one the adapter recorded.
    base: str | None = None
    # Torch device of the policy.
    device: str = "cpu"
    # Show a progress bar.
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("episodes", "num_envs", "video_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be >= 1 step or null, got {self.horizon}.")
        if self.reference not in (None, "expert", "random"):
            raise ValueError(f"reference must be 'expert', 'random' or null, got {self.reference!r}.")
        if self.model_dir is None and self.reference is None:
            raise ValueError("Name the checkpoint to evaluate (eva-rl evaluate MODEL_DIR) or pass --reference expert|random.")
        if self.model_dir is not None and self.reference is not None:
            raise ValueError("Give either MODEL_DIR (model_dir) or --reference (reference), not both.")

    def targets(self, tasks: Sequence[str], from_data: Mapping[str, float] | None = None
                ) -> float | dict[str, float] | None:
        """The `target_returns` argument of `evaluate` for `tasks` (already resolved from suites);
        `from_data` is `dataset_target_returns(target_return_from)`, the lowest precedence."""
        from_data = {task: value for task, value in (from_data or {}).items() if task in tasks}
        if self.target_return_from and not from_data:
            raise ValueError(f"target_return_from {list(self.target_return_from)} holds none of the evaluated tasks "
                             f"({', '.join(tasks)}); name a dataset of these tasks.")
        if not self.target_returns and not from_data:
            return self.target_return
        stray = [task for task in self.target_returns if task not in tasks]
        if stray:  # a typo in a task name would otherwise be silently ignored
            raise ValueError(f"target_returns names {', '.join(stray)}, which {'is' if len(stray) == 1 else 'are'} "
                             f"not evaluated (tasks: {', '.join(tasks)}). Fix the task name, or add it to tasks.")
        fallback = from_data if self.target_return is None else {task: self.target_return for task in tasks}
        return {**fallback, **self.target_returns}


def dataset_target_returns(datasets: Sequence[str]) -> dict[str, float]:
    """{task: best episode return in `datasets`} (raw units): the target fine-tuning conditions on."""
    if not datasets:
        return {}
    from eva_rl.data.trajectories import load_trajectories

    data = load_trajectories(list(datasets))
    return {task: data.max_return(task) for task in data.task_names}
