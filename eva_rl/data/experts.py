"""Train Stable-Baselines3 SAC experts: the behaviour policies `collect --policy sb3:PATH` replays.

A run writes, under its out directory (TASK = the task's name):

    TASK-sac-STEPS.zip   a policy snapshot at each chosen step (an early one is a "medium" policy)
    TASK-sac.zip         the policy at the last step
    TASK-sac.json        the hyperparameters, and per snapshot: steps, evaluation returns, steps/s
    TASK-sac.resume/     model.zip + replay_buffer.pkl of the latest snapshot, to continue from

Every file is written atomically and the resume directory is swapped in whole, so a run killed at
any instant resumes from its latest snapshot with the model and its replay buffer in step.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eva_rl.envs import make_env, task_spec
from eva_rl.storage import atomic_dir, atomic_path, write_text_atomic

# The RL Zoo's tuned SAC hyperparameters (DLR-RM/rl-baselines3-zoo, hyperparams/sac.yml, read at
# commit 22e3ff2 of April 2026), as arguments of SB3's SAC on top of its defaults (lr 3e-4, buffer
# 1M, batch 256, tau 0.005, gamma 0.99, one gradient step per env step, automatic entropy, two
# 256-unit layers). The Zoo tunes the v4 MuJoCo bodies; v5 keeps their observations, actions and
# rewards, so a body's entry serves every version. `steps` is the Zoo's n_timesteps.
ZOO_SAC: dict[str, dict[str, Any]] = {
    "Pendulum": {"steps": 20_000, "learning_rate": 1e-3},
    "HalfCheetah": {"steps": 1_000_000, "learning_starts": 10_000},
    "Ant": {"steps": 1_000_000, "learning_starts": 10_000},
    "Hopper": {"steps": 1_000_000, "learning_starts": 10_000},
    "Walker2d": {"steps": 1_000_000, "learning_starts": 10_000},
    "Humanoid": {"steps": 2_000_000, "learning_starts": 10_000},
    "Swimmer": {"steps": 1_000_000, "learning_starts": 10_000, "gamma": 0.999},
}


def zoo_hyperparameters(task: str) -> dict[str, Any]:
    """The RL Zoo's SAC settings for `task` ("Hopper-v5" -> the Hopper entry), `steps` included."""
    body = task.split("-v")[0]
    if body not in ZOO_SAC:
        raise ValueError(
            f"The RL Zoo publishes no SAC hyperparameters for {task!r} that eva-rl knows; "
            f"known bodies: {sorted(ZOO_SAC)}. Train it with SB3 yourself and collect with --policy sb3:PATH."
        )
    return dict(ZOO_SAC[body])


@dataclass(frozen=True)
class ExpertConfig:
    """One SAC expert run."""

    task: str  # a Gymnasium task named in envs/ (e.g. Hopper-v5)
    out: str  # directory of the snapshots, the log and the resume state
    steps: int | None = None  # env steps in all; None = the RL Zoo's n_timesteps for the task
    save_at: tuple[int, ...] = ()  # extra snapshot steps (e.g. an early "medium" policy)
    save_every: int = 0  # also snapshot every this many steps (0 = only save_at and the end)
    eval_episodes: int = 5  # deterministic episodes scored at each snapshot (0 = none)
    seed: int = 0  # seeds the env, SB3 and torch; evaluation uses seed + 10_000
    resume: bool = False  # continue from the resume state in `out` (an error if there is none)
    threads: int = 1  # torch threads; SAC's 256-unit MLPs gain nothing from more on a shared CPU
    sac_overrides: dict[str, Any] = field(default_factory=dict)  # SB3 SAC arguments over the Zoo's

    def __post_init__(self) -> None:
        task_spec(self.task)  # an unknown task fails here, with the close names
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None (the Zoo's), got {self.steps}.")
        if any(s < 1 for s in self.save_at):
            raise ValueError(f"save_at steps must be >= 1, got {list(self.save_at)}.")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 steps, got {self.save_every}.")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes}.")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}.")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else int(zoo_hyperparameters(self.task)["steps"])

    def snapshot_steps(self) -> list[int]:
        """The steps at which a snapshot is written, the last step always among them."""
        total = self.total_steps
        every = range(self.save_every, total, self.save_every) if self.save_every else ()
        return sorted({s for s in (*self.save_at, *every) if s < total} | {total})


def expert_paths(out: str | Path, task: str) -> dict[str, Path]:
    """Where a run for `task` writes: final zip, log, resume directory."""
    out = Path(out)
    return {"final": out / f"{task}-sac.zip", "log": out / f"{task}-sac.json", "resume": out / f"{task}-sac.resume"}


def snapshot_path(out: str | Path, task: str, steps: int) -> Path:
    return Path(out) / f"{task}-sac-{steps}.zip"


@dataclass(frozen=True)
class ExpertResult:
    """What a run reached: its final zip, its steps, and its log's snapshot records."""

    path: Path  # TASK-sac.zip
    steps: int  # env steps the model has taken in all (across resumes)
    snapshots: list[dict[str, Any]]  # per snapshot: steps, path, mean_return, std_return, steps_per_second

    def describe(self) -> str:
        lines = [f"{self.steps} steps -> {self.path}"]
        for s in self.snapshots:
            ret = "" if s["mean_return"] is None else f", return {s['mean_return']:.1f} +- {s['std_return']:.1f}"
            rate = f"{s['steps_per_second']:.1f} steps/s, {s.get('steps_per_cpu_second', float('nan')):.1f} per CPU-s"
            lines.append(f"  {s['steps']:>9} steps{ret} ({rate}) {s['path']}")
        return "\n".join(lines)


def _evaluate(model, task: str, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of `episodes` deterministic episodes on a fresh env seeded `seed`."""
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    env = Monitor(make_env(task, seed))
    try:
        returns, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True,
                                     return_episode_rewards=True)
    finally:
        env.close()
    return [float(r) for r in returns]


def _save_snapshot(model, config: ExpertConfig, log: dict[str, Any], seconds: float, cpu_seconds: float,
                   steps_done: int) -> None:
    """Write the policy zip, its evaluation, and the resume state for the model's current step."""
    steps = int(model.num_timesteps)
    paths = expert_paths(config.out, config.task)
    target = paths["final"] if steps >= config.total_steps else snapshot_path(config.out, config.task, steps)
    with atomic_path(target) as tmp:
        model.save(tmp)
    returns = _evaluate(model, config.task, config.eval_episodes, config.seed + 10_000) if config.eval_episodes else []
    log["snapshots"].append({
        "steps": steps, "path": str(target),
        "mean_return": float(np.mean(returns)) if returns else None,
        "std_return": float(np.std(returns)) if returns else None,
        "returns": returns,
        "steps_per_second": steps_done / max(seconds, 1e-9),  # of this process's training, evaluation excluded
        # On a shared machine wall time measures the neighbours; CPU time measures the work.
        "steps_per_cpu_second": steps_done / max(cpu_seconds, 1e-9),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    with atomic_dir(paths["resume"]) as tmp:
        model.save(tmp / "model.zip")
        model.save_replay_buffer(tmp / "replay_buffer.pkl")
    write_text_atomic(paths["log"], json.dumps(log, indent=1) + "\n")


def _snapshot_callback(config: ExpertConfig, log: dict[str, Any], start_steps: int):
    from stable_baselines3.common.callbacks import BaseCallback

    class Snapshots(BaseCallback):
        """Advances the progress bar; at each snapshot step writes the snapshot (see _save_snapshot)."""

        def _on_training_start(self) -> None:
            self.pending = [s for s in config.snapshot_steps() if s > start_steps]
            self.train_seconds, self.last = 0.0, time.perf_counter()
            self.cpu_seconds, self.last_cpu = 0.0, time.process_time()
            # A log file is no terminal: a redraw every half minute keeps it readable.
            self.bar = tqdm(total=config.total_steps, initial=start_steps, desc=f"SAC {config.task}",
                            unit="step", mininterval=0.5 if sys.stderr.isatty() else 30.0)

        def _on_step(self) -> bool:
            self.bar.update(1)
            if self.pending and self.num_timesteps >= self.pending[0]:
                self.pending.pop(0)
                self.train_seconds += time.perf_counter() - self.last
                self.cpu_seconds += time.process_time() - self.last_cpu
                _save_snapshot(self.model, config, log, self.train_seconds, self.cpu_seconds,
                               self.num_timesteps - start_steps)
                latest = log["snapshots"][-1]
                if latest["mean_return"] is not None:
                    self.bar.write(f"{latest['steps']} steps: return {latest['mean_return']:.1f} "
                                   f"+- {latest['std_return']:.1f} -> {latest['path']}")
                self.last, self.last_cpu = time.perf_counter(), time.process_time()
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return Snapshots()


def _build_model(config: ExpertConfig, env, log: dict[str, Any]):
    """A fresh SAC with the Zoo's settings, or the saved one with its replay buffer when resuming."""
    from stable_baselines3 import SAC

    resume_dir = expert_paths(config.out, config.task)["resume"]
    if config.resume:
        if not (resume_dir / "model.zip").is_file():
            raise FileNotFoundError(
                f"No resume state at {resume_dir} (model.zip + replay_buffer.pkl). "
                "Drop --resume to start a new run there."
            )
        model = SAC.load(resume_dir / "model.zip", env=env, device="cpu")
        model.load_replay_buffer(resume_dir / "replay_buffer.pkl")
        # The saved last observation belongs to the old process's env; SB3 resets when it is None.
        # The episode that was running is cut there, which an off-policy learner tolerates.
        model._last_obs = None
        return model
    if resume_dir.exists():
        raise FileExistsError(
            f"{resume_dir} holds an earlier run's state. Pass --resume to continue it, or use another --out."
        )
    kwargs = {k: v for k, v in log["hyperparameters"].items() if k != "steps"}
    return SAC("MlpPolicy", env, seed=config.seed, device="cpu", verbose=0, **kwargs)


def train_expert(config: ExpertConfig) -> ExpertResult:
    """Train (or continue) the SAC expert of `config.task`; see the module docstring for its files."""
    from stable_baselines3.common.monitor import Monitor

    torch.set_num_threads(config.threads)
    paths = expert_paths(config.out, config.task)
    hyper = {**zoo_hyperparameters(config.task), **config.sac_overrides, "steps": config.total_steps}
    log = {"task": config.task, "algorithm": "sac", "source": "RL Zoo hyperparams/sac.yml",
           "hyperparameters": hyper, "config": {**asdict(config), "save_at": list(config.save_at)},
           "snapshots": []}
    if config.resume and paths["log"].is_file():
        log["snapshots"] = json.loads(paths["log"].read_text())["snapshots"]
    env = Monitor(make_env(config.task, config.seed))
    try:
        model = _build_model(config, env, log)
        start = int(model.num_timesteps)
        remaining = config.total_steps - start
        if remaining > 0:
            model.learn(remaining, callback=_snapshot_callback(config, log, start),
                        reset_num_timesteps=not config.resume)
    finally:
        env.close()
    return ExpertResult(path=paths["final"], steps=int(model.num_timesteps), snapshots=log["snapshots"])
