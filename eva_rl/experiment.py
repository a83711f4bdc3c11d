"""Grids of runs: `eva-rl experiment CONFIG` (collect -> pretrain -> finetune/evaluate).

An experiment YAML (`ExperimentConfig`) names the data to collect, a pretrained checkpoint or a
pretraining stage to run first, and a fine-tuning grid: tasks x methods x ranks x seeds x any
swept config key. Each stage whose outputs exist is not redone. Layout of `out_dir`:

    datasets/                       Minari datasets (unless collect.datasets_dir says elsewhere)
    pretrain/                       the pretraining run (train.py's layout; model/ is the checkpoint)
    runs/<task>/<method>-r<rank>-s<seed>[-<key>-<value>...]/
        run.json, log.txt, error.txt                (written by the job runner, eva_rl/jobs.py)
        config.yaml, tb/, checkpoints/, metrics.json   (written by the training loop)

Re-running the same command skips finished runs (metrics.json, `eva_rl.rundir.is_finished`) and
resumes the others from their latest checkpoint. A run directory made by a different config is
never overwritten silently: planning stops with an error unless `overwrite=True`, which moves the
old run to `_replaced/`. Keys a newer release added, left at their defaults, do not count as a
different config (`eva_rl.rundir.config_differences`), so older runs are skipped or resumed.
A failed run is recorded (status failed, error.txt) and the others go on.

The stages below make jobs (`jobs.Job`) whose run functions are the pipeline's stage
functions; `jobs.run_jobs` runs them locally (one process per run) or on Ray.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from eva_rl.config import config_to_dict, load_config
from eva_rl.jobs import Job, JobResult, default_workers, run_jobs
from eva_rl.storage import write_text_atomic


# --- config ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollectStage:
    """Which datasets to collect (one per task and noise level); existing ones are reused."""

    # Collect missing datasets; False = they must exist already.
    enabled: bool = True
    # Root of the Minari datasets; None = <out_dir>/datasets.
    datasets_dir: str | None = None
    # Behaviour policy: "expert" (Meta-World scripted), "random", "sb3:PATH[:ALGO]".
    policy: str = "expert"
    # Gaussian action-noise sigmas; one dataset per task per sigma (mixed-quality data).
    noises: tuple[float, ...] = (0.1,)
    # Episodes per pretraining task and noise level.
    pretrain_episodes: int = 30
    # Episodes per fine-tuning task and noise level.
    finetune_episodes: int = 30
    # Seed of the envs and the noise.
    seed: int = 0
    # Steps per episode; None = the suite's horizon.
    horizon: int | None = None
    # Behaviour policy for the fine-tuning tasks; None = `policy` (e.g. an SB3 model of another body).
    finetune_policy: str | None = None
    # Behaviour policy for the pretraining tasks; None = `policy`.
    pretrain_policy: str | None = None
    # Per-task behaviour policies (task -> "sb3:PATH" or a list of them), e.g. one SB3 expert per
    # MuJoCo body; a list gives one dataset per policy and noise level (a medium and an expert
    # snapshot of one SB3 run: D4RL's medium-expert mixture).
    task_policies: dict[str, str | list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.noises or any(n < 0 for n in self.noises):
            raise ValueError(f"collect.noises must be non-empty and >= 0, got {self.noises}.")
        if self.pretrain_episodes < 1 or self.finetune_episodes < 1:
            raise ValueError("collect.pretrain_episodes and collect.finetune_episodes must be >= 1.")
        for task, policies in self.task_policies.items():
            if not policies or not all(isinstance(p, str) and p for p in _as_list(policies)):
                raise ValueError(f"collect.task_policies.{task} must be a policy (\"sb3:PATH\") or a non-empty list "
                                 f"of them, got {policies!r}.")


@dataclass(frozen=True)
class PretrainStage:
    """The pretrained checkpoint: an existing one, or a pretraining run made first."""

    # Existing pretrained model directory; when set, no pretraining is run.
    checkpoint: str | None = None
    # Tasks or suites to pretrain on (their datasets are collected).
    tasks: tuple[str, ...] = ()
    # Base TrainConfig YAML (path, or a name in the package's configs/); None = defaults.
    config: str | None = None
    # TrainConfig keys (nested or dotted) set for the pretraining run.
    overrides: dict[str, Any] = field(default_factory=dict)
    # CPU threads of the pretraining run; 0 = every core of the machine. Run alone (local backend), its
    # threads spin at barriers (eva_rl.jobs.set_threads; bench/threads.py measures what that buys).
    cpus: int = 0
    # GPUs of the pretraining run (Ray backend; the local backend uses what the config says).
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.checkpoint is None and not self.tasks:
            raise ValueError("pretrain: set pretrain.checkpoint (an existing model dir) or pretrain.tasks to pretrain on.")
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError("pretrain.cpus and pretrain.gpus must be >= 0.")


@dataclass(frozen=True)
class FinetuneStage:
    """The grid: tasks x methods x ranks x seeds x every swept key."""

    # Tasks or suites to fine-tune on.
    tasks: tuple[str, ...] = ()
    # Fine-tuning methods (fft, lora, dora, pissa, olora, adalora, eva, eva_dora).
    methods: tuple[str, ...] = ("lora", "eva")
    # Adapter ranks (fft ignores them: one fft run per task and seed).
    ranks: tuple[int, ...] = (8,)
    # Seeds: each one a run per grid point.
    seeds: tuple[int, ...] = (0,)
    # Per-method seeds replacing `seeds` for the methods named (method -> list), e.g. more seeds for
    # the comparisons a paper's claims rest on: {eva: [0, 1, 2, 3, 4], lora: [0, 1, 2, 3, 4]}.
    method_seeds: dict[str, list[int]] = field(default_factory=dict)
    # Base fine-tuning YAML (path, or a name in the package's configs/); None = defaults.
    config: str | None = None
    # Fine-tuning config keys (nested or dotted) set for every run.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Dotted fine-tuning config key -> list of values; each is a grid axis.
    sweep: dict[str, Any] = field(default_factory=dict)
    # Per-method keys, e.g. {fft: {train.optim.lr: 1e-4}, lora: {train.optim.lr: 1e-3}}.
    method_overrides: dict[str, Any] = field(default_factory=dict)
    # CPU threads per run (the local backend runs cores // cpus_per_run at once by default).
    cpus_per_run: int = 1
    # GPUs per run (Ray backend).
    gpus_per_run: float = 0.0

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("finetune.tasks is empty: name the tasks (or a suite) to fine-tune on.")
        if not self.methods or not self.seeds:
            raise ValueError("finetune.methods and finetune.seeds must each name at least one value.")
        for method, seeds in self.method_seeds.items():
            if method not in self.methods:
                raise ValueError(f"finetune.method_seeds names {method!r}, which is not in finetune.methods "
                                 f"{list(self.methods)}; fix the name or add the method.")
            if not isinstance(seeds, (list, tuple)) or not seeds:
                raise ValueError(f"finetune.method_seeds.{method} must be a non-empty list of seeds, got {seeds!r}.")
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"finetune.ranks must be >= 1, got {self.ranks}.")
        if self.cpus_per_run < 1:
            raise ValueError("finetune.cpus_per_run must be >= 1.")
        # `finetune.sweep.eva.rho=[1, 2]` on the command line arrives nested ({eva: {rho: [1, 2]}}): a dotted
        # key under sweep is one key, so nesting is undone here (values are lists, never mappings)
        object.__setattr__(self, "sweep", flatten(dict(self.sweep)))
        for key, values in self.sweep.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"finetune.sweep.{key} must be a non-empty list of values, got {values!r}.")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: collect -> pretrain -> fine-tuning grid (each run evaluates at its end)."""

    # Name shown in the progress display and the report.
    name: str = "experiment"
    # Root of everything the experiment writes (relative paths are relative to the working directory).
    out_dir: str = "runs/experiment"
    # Where the report of this experiment's runs goes; None = out_dir/report. Two configs sharing
    # an out_dir (a grid and a subset of it) keep apart reports here.
    report_dir: str | None = None
    # The datasets: which behaviour policy and noise levels, how many episodes, where they live.
    collect: CollectStage = field(default_factory=CollectStage)
    # The pretrained checkpoint: an existing one (pretrain.checkpoint) or a run made first.
    pretrain: PretrainStage = field(default_factory=lambda: PretrainStage(tasks=("reach-v3",)))
    # The fine-tuning grid: tasks x methods x ranks x seeds x swept keys, one run (and evaluation) each.
    finetune: FinetuneStage = field(default_factory=lambda: FinetuneStage(tasks=("push-v3",)))


def config_path(name: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> Path:
    """Find a config file: as given, next to `relative_to`, or in the package's configs.

    The package's configs are `eva_rl/_configs/` in a wheel (hatch force-includes configs/ there)
    and the repository's `configs/` in an editable install.
    """
    path = Path(name)
    candidates = [path]
    if not path.is_absolute():
        if relative_to is not None:
            candidates.append(Path(relative_to).parent / path)
        package = Path(__file__).resolve().parent
        # "configs/x.yaml" as the README writes it also finds the packaged x.yaml from any directory
        shipped = Path(*path.parts[1:]) if len(path.parts) > 1 and path.parts[0] == "configs" else path
        candidates += [package / "_configs" / shipped, package.parent / "configs" / shipped]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Config {str(name)!r} not found (looked in: {', '.join(str(c) for c in candidates)}). "
        f"Pass a path to a YAML file, or the name of one in configs/ (e.g. quickstart.yaml).")


def load_experiment(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an ExperimentConfig from YAML (found with `config_path`) plus dotted overrides."""
    return load_config(ExperimentConfig, config_path(path) if path is not None else None, overrides)


# --- grid ----------------------------------------------------------------------------------------

def expand_grid(stage: FinetuneStage, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Grid points in a stable order: task, method, rank, seed, then swept keys.

    fft has no rank, so it gets one point per (task, seed, swept values) with rank None.
    `tasks` replaces stage.tasks (already resolved from suite names).
    """
    points: list[dict[str, Any]] = []
    sweep = [(key, list(values)) for key, values in stage.sweep.items()]
    combos: list[dict[str, Any]] = [{}]
    for key, values in sweep:
        combos = [{**c, key: v} for c in combos for v in values]
    for task in tasks if tasks is not None else stage.tasks:
        for method in stage.methods:
            for rank in ([None] if method == "fft" else stage.ranks):
                for seed in stage.method_seeds.get(method, stage.seeds):
                    for combo in combos:
                        points.append({"task": task, "method": method, "rank": rank, "seed": seed, **combo})
    return points


def run_name(point: dict[str, Any]) -> str:
    """`<task>/<method>-r<rank>-s<seed>[-<key>-<value>...]` (rank left out when None), shell-safe.

    Values are spelt with letters, digits and `._+-` only (`eva.rho-2.0`, `train.optim.betas-0.9_0.99`),
    so a run's folder can be typed in a shell without quotes.
    """
    parts = [str(point["method"])]
    if point.get("rank") is not None:
        parts.append(f"r{point['rank']}")
    parts.append(f"s{point['seed']}")
    parts += [f"{k}-{_value_text(v)}" for k, v in point.items() if k not in ("task", "method", "rank", "seed")]
    return f"{point['task']}/" + re.sub(r"[^\w.+-]+", "_", "-".join(parts)).strip("_")


def legacy_run_name(point: dict[str, Any]) -> str:
    """The folder name runs had before names became shell-safe (`eva-r4-s0-eva.rho=2.0`), to find them."""
    parts = [str(point["method"])] + ([f"r{point['rank']}"] if point.get("rank") is not None else [])
    parts += [f"s{point['seed']}"]
    parts += [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in point.items()
              if k not in ("task", "method", "rank", "seed")]
    return f"{point['task']}/" + "-".join(parts).replace("/", "_")


def _value_text(value: Any) -> str:
    return re.sub(r"[^\w.+-]+", "_", json.dumps(value) if isinstance(value, (list, dict)) else str(value)).strip("_")


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}, "steps": 2} -> {"optim.lr": 1, "steps": 2} (dotted keys pass through)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_config(cls: type, yaml_path: str | os.PathLike | None, *layers: dict[str, Any]) -> dict[str, Any]:
    """The plain dict of `cls` from a YAML and dotted-key layers (later layers win); validates now.

    The layers are folded into one nested dict in Python and handed to `load_config` in a single
    merge (one OmegaConf merge per key was 100 ms a run); unknown keys and bad values raise the
    config's own ValueError (naming the key) before any run starts.
    """
    from omegaconf import OmegaConf

    merged: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist. Pass the path of a YAML file.")
        merged = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[assignment]
    for layer in layers:
        for key, value in flatten(layer).items():
            node = merged
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[leaf] = _plain(value)
    return config_to_dict(load_config(cls, base=merged))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --- the pipeline's stages -----------------------------------------------------------------------

class StageFailed(RuntimeError):
    """A stage the later ones depend on (pretraining) failed; its error.txt says why."""


@dataclass(frozen=True)
class ExperimentResult:
    out_dir: Path
    checkpoint: Path
    pretrain: JobResult | None
    runs: tuple[JobResult, ...]

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.runs if r.status == "failed"] + (
            [self.pretrain] if self.pretrain is not None and self.pretrain.status == "failed" else [])

    @property
    def missing(self) -> list[JobResult]:
        """Grid points without a result: failed, or still run by another command ("busy")."""
        return [r for r in self.runs if r.status not in ("done", "skipped")]


def dataset_paths(config: ExperimentConfig, tasks: Sequence[str], which: str) -> list[Path]:
    """The dataset directories of `tasks` for the pretrain or finetune stage (one per noise level)."""
    from eva_rl.data.collect import dataset_id

    root = datasets_dir(config)
    return [root / dataset_id(task, policy, noise)
            for task in tasks for policy in _task_policies(config.collect, task, which) for noise in config.collect.noises]


def datasets_dir(config: ExperimentConfig) -> Path:
    root = Path(config.collect.datasets_dir) if config.collect.datasets_dir else Path(config.out_dir) / "datasets"
    return root.resolve()


def _as_list(policies: str | Sequence[str]) -> list[str]:
    return [policies] if isinstance(policies, str) else list(policies)


def _task_policies(collect: CollectStage, task: str, which: str) -> list[str]:
    """The behaviour policies whose data the task gets in stage `which`: its own (task_policies),
    else the stage's, else `policy`."""
    specific = collect.pretrain_policy if which == "pretrain" else collect.finetune_policy
    return _as_list(collect.task_policies.get(task) or specific or collect.policy)


def collect_stage(config: ExperimentConfig, pretrain_tasks: Sequence[str], finetune_tasks: Sequence[str],
                  workers: int = 1) -> list[Path]:
    """Collect every missing dataset of the experiment; returns the datasets collected now."""
    from eva_rl.data.collect import CollectConfig, collect_tasks, dataset_id

    root = datasets_dir(config)
    made = []
    for which, tasks, episodes in (("pretrain", pretrain_tasks, config.collect.pretrain_episodes),
                                   ("finetune", finetune_tasks, config.collect.finetune_episodes)):
        by_policy: dict[str, list[str]] = {}
        for task in dict.fromkeys(tasks):
            for policy in _task_policies(config.collect, task, which):
                by_policy.setdefault(policy, []).append(task)
        for (policy, policy_tasks), noise in itertools.product(by_policy.items(), config.collect.noises):
            missing = [t for t in policy_tasks if not (root / dataset_id(t, policy, noise)).exists()]
            if not missing:
                continue
            if not config.collect.enabled:
                raise FileNotFoundError(
                    f"Datasets of {missing} (policy {policy}, noise {noise}) are missing under {root} and "
                    f"collect.enabled is false. Set collect.enabled=true or point collect.datasets_dir at them.")
            collect_config = CollectConfig(policy=policy, noise=noise, episodes=episodes, seed=config.collect.seed,
                                           horizon=config.collect.horizon, out=str(root),
                                           workers=min(workers, len(missing)))
            made += [s.path for s in collect_tasks(missing, collect_config)]
    return made


def pretrain_job(config: ExperimentConfig, tasks: Sequence[str], yaml_file: Path | None = None) -> Job:
    """The pretraining run: TrainConfig from pretrain.config + overrides, on the tasks' datasets."""
    from eva_rl.train import TrainConfig

    run_dir = Path(config.out_dir).resolve() / "pretrain"
    paths = [str(p) for p in dataset_paths(config, tasks, "pretrain")]
    base = config_path(config.pretrain.config, yaml_file) if config.pretrain.config else None
    resolved = resolve_config(TrainConfig, base, config.pretrain.overrides,
                              {"data.paths": paths, "out_dir": str(run_dir), "resume": True, "progress": False})
    cpus = config.pretrain.cpus or default_workers(1)
    return Job("pretrain", run_dir, resolved, {"stage": "pretrain"}, cpus=cpus, gpus=config.pretrain.gpus,
               defaults=config_to_dict(TrainConfig()))


def run_pretrain(run_dir: Path, config: dict[str, Any]) -> None:
    """Run function of the pretraining job (train.pretrain writes metrics.json and model/)."""
    from eva_rl.train import TrainConfig, pretrain

    pretrain(load_config(TrainConfig, base=config))


def finetune_jobs(config: ExperimentConfig, tasks: Sequence[str], checkpoint: Path,
                  yaml_file: Path | None = None) -> list[Job]:
    """One job per grid point, its FinetuneConfig resolved (and validated) now."""
    from eva_rl.adapters.methods import METHODS
    from eva_rl.finetune import FinetuneConfig

    stage = config.finetune
    misspelt = sorted(set(stage.method_overrides) - set(METHODS))
    if misspelt:  # a misspelt method would silently lose its overrides (e.g. fft's smaller lr)
        raise ValueError(f"finetune.method_overrides names {misspelt}, which are not methods; "
                         f"use method names: {', '.join(METHODS)}.")
    base = config_path(stage.config, yaml_file) if stage.config else None
    jobs = []
    defaults = config_to_dict(FinetuneConfig())
    runs = Path(config.out_dir).resolve() / "runs"
    points = expand_grid(stage, tasks)
    names = [run_name(_named_point(point, stage, base, checkpoint, config)) for point in points]
    if len(set(names)) < len(names):  # two swept values spelt alike once made shell-safe (e.g. "a b" and "a_b")
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"finetune.sweep gives two grid points the same run folder {twice[0]!r}: "
                         f"sweep values that differ in more than punctuation and spaces.")
    for point, name in zip(points, names):
        for older in (run_name(point), legacy_run_name(point)):  # folders of runs named before these rules
            if older != name and not (runs / name).exists() and (runs / older).exists():
                name = older
        run_dir = runs / name
        swept = {k: v for k, v in point.items() if k not in ("task", "method", "rank", "seed")}
        per_method = stage.method_overrides.get(point["method"]) or {}
        keys = finetune_keys(point, checkpoint, dataset_paths(config, [point["task"]], "finetune"), run_dir)
        resolved = resolve_config(FinetuneConfig, base, stage.overrides, per_method, swept, keys)
        jobs.append(Job(name, run_dir, resolved, point, cpus=stage.cpus_per_run, gpus=stage.gpus_per_run,
                        defaults=defaults))
    return jobs


def _named_point(point: dict[str, Any], stage: FinetuneStage, base: Path | None, checkpoint: Path,
                 config: ExperimentConfig) -> dict[str, Any]:
    """The grid point without the swept keys whose value the config holds anyway (a sweep over
    `train.data.episodes: [5, null]` at its default null): such a run is the unswept grid's run,
    so it is named like it and another grid in the same out_dir (a lite recipe) shares it."""
    swept = [k for k in point if k not in ("task", "method", "rank", "seed")]
    if not swept:
        return point
    from eva_rl.finetune import FinetuneConfig

    per_method = stage.method_overrides.get(point["method"]) or {}
    keys = finetune_keys(point, checkpoint, dataset_paths(config, [point["task"]], "finetune"), Path("."))
    unswept = flatten(resolve_config(FinetuneConfig, base, stage.overrides, per_method, keys))
    return {k: v for k, v in point.items() if k not in swept or unswept.get(k, point) != _plain(v)}


def finetune_keys(point: dict[str, Any], checkpoint: Path, paths: Sequence[Path], run_dir: Path) -> dict[str, Any]:
    """The FinetuneConfig keys a grid point fixes (method, rank, seed, data, checkpoint, run dir)."""
    keys: dict[str, Any] = {
        "checkpoint": str(checkpoint), "method": point["method"],
        "train.seed": point["seed"], "train.out_dir": str(run_dir), "train.resume": True, "train.progress": False,
        "train.data.paths": [str(p) for p in paths],
    }
    if point.get("rank") is not None:
        keys["rank"] = point["rank"]
    return keys


def run_finetune(run_dir: Path, config: dict[str, Any]) -> None:
    """Run function of a fine-tuning job (finetune writes metrics.json, adapter, eva_report.json)."""
    from eva_rl.finetune import FinetuneConfig, finetune

    finetune(load_config(FinetuneConfig, base=config))


def run_experiment(config: ExperimentConfig, *, backend: str = "local", workers: int | None = None,
                   address: str | None = None, overwrite: bool = False, progress: bool = True,
                   yaml_path: str | os.PathLike | None = None) -> ExperimentResult:
    """Collect -> pretrain -> fine-tuning grid; every stage skips what is already done.

    yaml_path: the experiment's YAML, so that relative `config:` entries resolve next to it.
    Returns the per-run results; failed runs are listed in `result.failed` (their error.txt says why).
    """
    from eva_rl.envs import resolve_tasks

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finetune_tasks = resolve_tasks(list(config.finetune.tasks))
    pretrain_tasks = resolve_tasks(list(config.pretrain.tasks)) if config.pretrain.checkpoint is None else []
    write_text_atomic(out / "experiment.json", json.dumps(config_to_dict(config), indent=2))
    stage_workers = workers or default_workers(1)
    collect_stage(config, pretrain_tasks, finetune_tasks, workers=stage_workers)
    pretrain_result = None
    if config.pretrain.checkpoint is not None:
        checkpoint = Path(config.pretrain.checkpoint).resolve()  # Ray workers may start elsewhere
        if not checkpoint.exists():
            raise FileNotFoundError(f"pretrain.checkpoint {str(checkpoint)!r} does not exist. Point it at a "
                                    f"pretrained model directory, or unset it and name pretrain.tasks.")
    else:
        job = pretrain_job(config, pretrain_tasks, Path(yaml_path) if yaml_path else None)
        [pretrain_result] = run_jobs([job], run_pretrain, backend=backend, workers=1, address=address,
                                     overwrite=overwrite, progress=progress, label=f"{config.name}: pretrain")
        if pretrain_result.status == "failed":
            raise StageFailed(f"Pretraining failed; see {job.run_dir / 'error.txt'}. Fix it and run again "
                              f"(finished stages are skipped).")
        if pretrain_result.status == "busy":  # its model/ does not exist yet: every fine-tuning run would fail
            raise StageFailed(f"Pretraining ({job.run_dir}) is {pretrain_result.error}, another experiment command; "
                              f"run this one again when it has finished.")
        checkpoint = job.run_dir / "model"
    jobs = finetune_jobs(config, finetune_tasks, checkpoint, Path(yaml_path) if yaml_path else None)
    results = run_jobs(jobs, run_finetune, backend=backend, workers=workers, address=address, overwrite=overwrite,
                       progress=progress, label=f"{config.name}: finetune")
    return ExperimentResult(out, checkpoint, pretrain_result, tuple(results))
