"""Gymnasium environments for the tasks named in the suites of `envs/`.

Every env made here has the same contract, whatever its family:
  * observations are float32;
  * `info["success"]` is a bool at every step (how it is read is the task's `success` rule);
  * seeding is explicit and deterministic: `make_env(task, seed)` twice gives identical first
    observations, and successive resets walk the same seeded sequence of initial states/goals.

Meta-World ignores `reset(seed=...)`: its goal is drawn by a task-selection wrapper from the
env's own generator, which the benchmark seeds at construction. We therefore build Meta-World
envs through `metaworld.make_mt_envs(seed=...)` and never pass a seed to reset. Its wrapper that
ends an episode at the first success is a suite setting here, off by default.
"""

from __future__ import annotations

import difflib
import functools
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np
import yaml

FAMILIES = ("metaworld", "mujoco", "classic")

# Meta-World's SawyerXYZEnv refuses to step past this many steps.
METAWORLD_MAX_HORIZON = 500
# Every Meta-World v3 task: a 39-dim observation and a 4-dim action.
METAWORLD_SHAPES = ((39,), (4,))


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite, as declared in `envs/<suite>.yaml`."""

    name: str  # the env id (Gymnasium) or the Meta-World task name (e.g. "hammer-v3")
    family: str  # "metaworld" | "mujoco" | "classic"
    horizon: int  # steps per episode before truncation
    success: str = "info"  # "info" | "survive" | "return>=X": how info["success"] is read
    expert: str | None = None  # "metaworld" when a scripted expert exists, else None
    terminate_on_success: bool = False  # end the episode at the first success
    ref_min_score: float | None = None  # random-policy reference return, where known
    ref_max_score: float | None = None  # expert reference return, where known

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Task {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}.")
        if self.horizon < 1:
            raise ValueError(f"Task {self.name!r}: horizon must be >= 1 step, got {self.horizon}.")
        if self.family == "metaworld" and self.horizon > METAWORLD_MAX_HORIZON:
            raise ValueError(
                f"Task {self.name!r}: Meta-World episodes can be at most {METAWORLD_MAX_HORIZON} steps, "
                f"got horizon={self.horizon}. Use a horizon of 500 or less."
            )
        _success_threshold(self.success, self.name)  # validates the rule
        if self.terminate_on_success and self.success != "info":
            # "survive" and "return>=X" are only known at the episode's last step, and turning a
            # time-limit truncation into a termination would misreport how the episode ended.
            raise ValueError(
                f"Task {self.name!r}: terminate_on_success needs the 'info' success rule (success read "
                f"during the episode), but this task's rule is {self.success!r}. Leave terminate_on_success off."
            )


@dataclass(frozen=True)
class Suite:
    """A named list of tasks, read from one YAML file of `envs/`."""

    name: str
    family: str
    tasks: tuple[TaskSpec, ...]


def suites_dir() -> Path:
    """The folder of suite YAML files: inside an installed wheel, or the repository's `envs/`."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_suites", package.parent / "envs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"No suite folder found (looked for {package / '_suites'} and {package.parent / 'envs'}). "
        "Reinstall eva-rl (pip install -e .) from a full checkout."
    )


def _success_threshold(rule: str, task: str) -> float | None:
    """The X of a "return>=X" rule, None for "info"/"survive"; a ValueError for anything else."""
    if rule in ("info", "survive"):
        return None
    if rule.startswith("return>="):
        try:
            return float(rule[len("return>="):])
        except ValueError:
            pass
    raise ValueError(
        f"Task {task!r}: success rule {rule!r} is not one of 'info', 'survive', 'return>=X' (X a number)."
    )


def _read_suite(path: Path) -> Suite:
    raw = yaml.safe_load(path.read_text())
    defaults = dict(raw.get("defaults") or {})
    tasks = []
    for entry in raw["tasks"]:
        fields = {"name": entry} if isinstance(entry, str) else dict(entry)
        tasks.append(TaskSpec(family=raw["family"], **{**defaults, **fields}))
    return Suite(name=raw["name"], family=raw["family"], tasks=tuple(tasks))


@functools.lru_cache(maxsize=1)
def load_suites() -> dict[str, Suite]:
    """Every suite in the suite folder, by name (`mt10`, `mt40`, `mt50`, `cw10`, `mujoco`, `classic`)."""
    suites = {}
    for path in sorted(suites_dir().glob("*.yaml")):
        suite = _read_suite(path)
        suites[suite.name] = suite
    return suites


@functools.lru_cache(maxsize=1)
def _all_tasks() -> dict[str, TaskSpec]:
    """Every task of every suite; a task in several suites (push-v3 is in mt10, mt50, cw10) must be
    declared alike in each, or which suite's horizon applies would depend on the file order."""
    tasks: dict[str, TaskSpec] = {}
    first_suite: dict[str, str] = {}
    for suite in load_suites().values():
        for spec in suite.tasks:
            if spec.name in tasks and tasks[spec.name] != spec:
                raise ValueError(
                    f"Task {spec.name!r} is declared differently in suites {first_suite[spec.name]!r} "
                    f"({tasks[spec.name]}) and {suite.name!r} ({spec}). Make the suite files agree."
                )
            tasks.setdefault(spec.name, spec)
            first_suite.setdefault(spec.name, suite.name)
    return tasks


def _unknown_name_error(name: str) -> ValueError:
    known = list(_all_tasks()) + list(load_suites())
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ValueError(
        f"Unknown task or suite {name!r}.{hint} Suites: {', '.join(load_suites())}. "
        f"Task names are listed in the suite files under {suites_dir()}."
    )


def normalized_score(task: str, episode_return: float) -> float | None:
    """D4RL's normalised score of a return on `task`: 100 * (return - ref_min) / (ref_max - ref_min),
    0 for the random policy and 100 for the reference expert; None where the task has no references
    (every Meta-World task) or is not declared here."""
    spec = _all_tasks().get(task)
    if spec is None or spec.ref_min_score is None or spec.ref_max_score is None:
        return None
    return 100.0 * (float(episode_return) - spec.ref_min_score) / (spec.ref_max_score - spec.ref_min_score)


def task_spec(name: str) -> TaskSpec:
    """The spec of task `name`; a ValueError listing close matches if no suite declares it."""
    try:
        return _all_tasks()[name]
    except KeyError:
        raise _unknown_name_error(name) from None


def resolve_tasks(names: str | Sequence[str]) -> list[str]:
    """Expand suite names into their tasks, keep task names, drop repeats, keep order."""
    if isinstance(names, str):
        names = [names]
    resolved: list[str] = []
    for name in names:
        suite = load_suites().get(name)
        expanded = [spec.name for spec in suite.tasks] if suite else [task_spec(name).name]
        resolved.extend(task for task in expanded if task not in resolved)
    if not resolved:
        raise ValueError("No tasks given: name at least one task or suite (e.g. 'cw10' or 'reach-v3').")
    return resolved


class _Float32Observation(gym.ObservationWrapper):
    """Casts observations (Meta-World's are float64) and the observation space to float32."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            low=space.low.astype(np.float32), high=space.high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation, dtype=np.float32)


class _SuccessInfo(gym.Wrapper):
    """Writes `info["success"]` (bool) at every step by the task's rule, and ends the episode at the
    first success when `terminate_on_success` (the same for every family: Meta-World's own
    wrapper for it is left off).

    "info": the env's own flag. "survive": True at the last step of an episode that was truncated
    by the horizon without terminating. "return>=X": True at the last step if the return reached X.
    """

    def __init__(self, env: gym.Env, rule: str, task: str, terminate_on_success: bool = False):
        super().__init__(env)
        self._rule = rule
        self._threshold = _success_threshold(rule, task)
        self._terminate_on_success = terminate_on_success
        self._episode_return = 0.0

    def reset(self, **kwargs: Any):
        self._episode_return = 0.0
        observation, info = self.env.reset(**kwargs)
        info["success"] = False
        return observation, info

    def step(self, action: np.ndarray):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._episode_return += float(reward)
        ended = terminated or truncated
        if self._rule == "info":
            success = bool(info.get("success", 0.0))
        elif self._rule == "survive":
            success = bool(truncated and not terminated)
        else:
            success = bool(ended and self._episode_return >= self._threshold)
        info["success"] = success
        return observation, reward, terminated or (success and self._terminate_on_success), truncated, info


class _SeedFirstReset(gym.Wrapper):
    """Seeds the first `reset()` with the construction seed; later resets continue that stream.

    Gymnasium envs draw initial states from the generator seeded at the first reset, so this
    makes `make_env(task, seed)` deterministic without the caller passing seeds to reset.
    """

    def __init__(self, env: gym.Env, seed: int):
        super().__init__(env)
        self._pending_seed: int | None = seed

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


@functools.lru_cache(maxsize=512)
def _metaworld_goals(name: str, seed: int) -> tuple:
    """Meta-World's 50 seeded goal variants of task `name` (what `MT1(name, seed)` draws).

    Drawing them costs 50 env resets (about a second); evaluation rebuilds the same envs
    (same task, same seeds) at every periodic evaluation, so they are drawn once per process.
    """
    import metaworld

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(metaworld.MT1(name, seed=seed).train_tasks)


def _make_metaworld(spec: TaskSpec, seed: int, horizon: int, render_mode: str | None, **kwargs: Any) -> gym.Env:
    import metaworld
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    # The render camera must be chosen at construction; "corner" frames the whole table.
    if render_mode is not None:
        kwargs.setdefault("camera_name", "corner")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # What metaworld.make_mt_envs(name, seed=...) does, minus re-drawing the cached goals
        # (metaworld is pinned to 3.1.x, whose _init_each_env this is).
        env = metaworld._init_each_env(
            env_cls=ALL_V3_ENVIRONMENTS[spec.name], tasks=list(_metaworld_goals(spec.name, seed)), seed=seed,
            num_tasks=1, max_episode_steps=horizon,
            terminate_on_success=False,  # _SuccessInfo does it for every family
            render_mode=render_mode, **kwargs)
    # Goals come from the seeded task-selection wrapper; a reset seed would be ignored anyway.
    env.action_space.seed(seed)
    return env


def _make_gymnasium(spec: TaskSpec, seed: int, horizon: int, render_mode: str | None, **kwargs: Any) -> gym.Env:
    env = gym.make(spec.name, max_episode_steps=horizon, render_mode=render_mode,
                   disable_env_checker=True, **kwargs)
    env.action_space.seed(seed)
    return _SeedFirstReset(env, seed)


def make_env(task: str, seed: int, *, horizon: int | None = None, terminate_on_success: bool | None = None,
             render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """A single env for `task`, seeded with `seed` (see the module docstring for the contract).

    horizon: steps per episode (default: the suite's; Meta-World allows at most 500).
    terminate_on_success: end episodes at the first success (default: the suite's, off).
    kwargs go to the env's constructor.
    """
    spec = task_spec(task)
    overrides = {}
    if horizon is not None:
        overrides["horizon"] = int(horizon)
    if terminate_on_success is not None:
        overrides["terminate_on_success"] = bool(terminate_on_success)
    spec = replace(spec, **overrides)  # re-runs the spec's validation (e.g. Meta-World's horizon cap)
    if spec.family == "metaworld":
        env = _make_metaworld(spec, seed, spec.horizon, render_mode, **kwargs)
    else:
        env = _make_gymnasium(spec, seed, spec.horizon, render_mode, **kwargs)
    env = _SuccessInfo(env, spec.success, spec.name, spec.terminate_on_success)
    return _Float32Observation(env)


def make_vector_env(tasks: Sequence[str], num_envs: int, seed: int, *, asynchronous: bool = False,
                    autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
                    first_env_kwargs: Mapping[str, Any] | None = None,
                    **make_env_kwargs: Any) -> gym.vector.VectorEnv:
    """`num_envs` envs in one Gymnasium vector env; env i runs `tasks[i % len(tasks)]`, seeded `seed + i`.

    asynchronous: one process per env (`AsyncVectorEnv`), else all in this process.
    autoreset_mode: Gymnasium's; the default NEXT_STEP means that after an env's episode ends,
    the *next* `step` call resets it and returns its first observation with reward 0 and no
    termination, and callers must not count that step. Evaluation passes DISABLED and resets
    ended envs itself (`reset(options={"reset_mask": ...})`), so no reset step exists at all.
    first_env_kwargs: extra `make_env` kwargs for env 0 only (e.g. a render mode to record it);
    the vector env is then synchronous, so that `vec.envs[0]` is that env.
    Tasks of different observation or action sizes cannot share a vector env: make one per task.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
    tasks = resolve_tasks(tasks)
    used = tasks[:num_envs]
    if len(used) > 1:
        shapes = {task: space_shapes(task) for task in used}
        if len(set(shapes.values())) > 1:
            sizes = ", ".join(f"{task} {obs}/{act}" for task, (obs, act) in shapes.items())
            raise ValueError(
                f"Tasks of different observation/action sizes cannot share a vector env ({sizes}). "
                "Build one vector env per task (or per group of tasks of one size)."
            )
    factories: list[Callable[[], gym.Env]] = [
        functools.partial(make_env, tasks[i % len(tasks)], seed + i, **make_env_kwargs) for i in range(num_envs)
    ]
    if first_env_kwargs:
        factories[0] = functools.partial(make_env, tasks[0], seed, **{**make_env_kwargs, **first_env_kwargs})
        asynchronous = False
    vector_cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return vector_cls(factories, autoreset_mode=autoreset_mode)


class SubprocessVectorEnv:
    """A synchronous vector env (`make_vector_env(..., asynchronous=False)`) living in one worker
    process: `step_async` sends actions and returns at once, `step_wait` collects the results,
    so the caller computes while the envs step.

    Written here because Gymnasium's `AsyncVectorEnv` runs one process per env: with 16 envs on a
    2-core machine, 16 processes must each be scheduled at every step, and on a loaded machine
    each wake-up waits its turn; one process steps all of its envs per wake-up.
    Results are those of the same envs stepped in this process.
    """

    def __init__(self, tasks: Sequence[str], num_envs: int, seed: int, **make_vector_env_kwargs: Any) -> None:
        import multiprocessing

        if make_vector_env_kwargs.get("asynchronous") or make_vector_env_kwargs.get("first_env_kwargs"):
            raise ValueError("SubprocessVectorEnv steps a synchronous vector env in its worker: "
                             "pass neither asynchronous nor first_env_kwargs.")
        self._conn, child = multiprocessing.Pipe()
        builder = functools.partial(make_vector_env, list(tasks), num_envs, seed, **make_vector_env_kwargs)
        self._process = multiprocessing.Process(target=_vector_env_worker, args=(child, builder), daemon=True)
        self._process.start()
        child.close()
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = self._receive()
        self._waiting = False

    def _receive(self) -> Any:
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"The env worker process died (exit code {self._process.exitcode}).") from None
        if status == "error":
            raise RuntimeError(f"The env worker process failed:\n{payload}")
        return payload

    def step_async(self, actions: np.ndarray) -> None:
        self._conn.send(("step", actions))
        self._waiting = True

    def step_wait(self) -> tuple:
        """(obs, rewards, terminated, truncated, info) of the step sent by `step_async`."""
        self._waiting = False
        return self._receive()

    def step(self, actions: np.ndarray) -> tuple:
        self.step_async(actions)
        return self.step_wait()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        if self._waiting:
            raise RuntimeError("reset called while a step is in flight; call step_wait first.")
        self._conn.send(("reset", {"seed": seed, "options": options}))
        return self._receive()

    def cpu_seconds(self) -> float:
        """CPU time the worker process has used so far (`time.process_time()` there)."""
        if self._waiting:
            raise RuntimeError("cpu_seconds called while a step is in flight; call step_wait first.")
        self._conn.send(("cpu", None))
        return float(self._receive())

    def close(self) -> None:
        if self._process.is_alive():
            try:
                if self._waiting:
                    self._conn.recv()
                self._conn.send(("close", None))
                self._conn.recv()
            except (EOFError, BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()
        self._conn.close()


def _vector_env_worker(conn: Any, builder: Callable[[], gym.vector.VectorEnv]) -> None:
    """The loop of a `SubprocessVectorEnv`'s process: build, then answer commands until "close"."""
    import traceback

    envs = None
    try:
        envs = builder()
        conn.send(("ok", (envs.single_observation_space, envs.single_action_space)))
        while True:
            command, data = conn.recv()
            if command == "step":
                conn.send(("ok", envs.step(data)))
            elif command == "reset":
                conn.send(("ok", envs.reset(**data)))
            elif command == "cpu":
                conn.send(("ok", time.process_time()))
            else:
                conn.send(("ok", None))
                break
    except (KeyboardInterrupt, EOFError):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        if envs is not None:
            envs.close()
        conn.close()


@functools.lru_cache(maxsize=None)
def space_shapes(task: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(observation shape, action shape) of `task`, without building a Meta-World env (about 1 s each)."""
    spec = task_spec(task)
    if spec.family == "metaworld":
        return METAWORLD_SHAPES
    env = gym.make(spec.name, disable_env_checker=True)
    try:
        return tuple(env.observation_space.shape), tuple(env.action_space.shape)
    finally:
        env.close()


def expert_policy(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """The scripted expert of `task`: a function from one observation (obs_dim,) to an action (act_dim,).

    Only Meta-World tasks have one; for others collect with an SB3 model (`sb3:PATH`).
    """
    spec = task_spec(task)
    if spec.expert != "metaworld":
        raise ValueError(
            f"Task {task!r} has no scripted expert. Collect with a trained model instead: "
            "--policy sb3:PATH (a Stable-Baselines3 .zip)."
        )
    from metaworld.policies import ENV_POLICY_MAP

    scripted = ENV_POLICY_MAP[spec.name]()
    # The experts warn on their first action that their gains exceed the [-1, 1] action range;
    # that is by design (the env clips), and the warning drowns progress bars in every worker.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

    def act(observation: np.ndarray) -> np.ndarray:
        # The experts index a 39-dim float64 observation and can return actions beyond [-1, 1];
        # the env clips them, so the clipped action is what was executed (and what a DT with a
        # tanh head can imitate).
        action = scripted.get_action(np.asarray(observation, dtype=np.float64))
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    return act
