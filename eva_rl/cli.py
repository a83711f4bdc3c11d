"""The `eva-rl` command: parses arguments, loads a config, calls one function per subcommand.

Every subcommand's work lives in the module named after its pipeline step; this file only
translates the command line into that call, and turns user errors into one clean message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

class Command(NamedTuple):
    add_args: Callable[[argparse.ArgumentParser], None]   # declares the subcommand's arguments
    run: Callable[[argparse.Namespace], int]              # does its work; returns the exit code
    config: Callable[[], type] | None = None              # its config class (imported lazily), for --print-config


COMMANDS: dict[str, Command] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None], config: Callable[[], type] | None = None):
    """Register `run(args) -> exit code` as the subcommand `name` whose arguments `add_args` declares.

    config: returns the command's config class; the command then takes --print-config.
    """
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(add_args, run, config)
        return run
    return register


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The YAML file and the overrides; a first positional `key=value` is an override, not a file."""
    config_file, overrides = args.config, list(args.overrides)
    if config_file is not None and "=" in config_file and not config_file.endswith((".yaml", ".yml")):
        config_file, overrides = None, [config_file] + overrides
    return config_file, overrides


def check_output(path: str | os.PathLike, what: str, *, directory: bool) -> Path:
    """`path` if this process can write it as a directory (or a file); else one clear ValueError.

    Called by every command before its work starts, so that an hour of evaluation or training is
    not lost to an output that cannot be written at the end. An existing directory (or file, when
    a file is asked for) is fine: the command decides whether it may be reused or replaced.
    """
    path = Path(path).expanduser()
    kind = "directory" if directory else "file"
    if path.exists():
        if path.is_dir() != directory:
            actual = "directory" if path.is_dir() else "file"
            raise ValueError(f"{what} {str(path)!r} is an existing {actual}, not a {kind}. "
                             f"Name a {kind} (a new path, or another {kind}).")
        target = path if directory else path.parent
    else:
        target = path.parent
        while not target.exists():  # the nearest existing ancestor is where the path will be made
            target = target.parent
        if not target.is_dir():
            raise ValueError(f"{what} {str(path)!r} cannot be made: {str(target)!r} is a file, not a directory. "
                             f"Choose a path that is not under a file.")
    if not os.access(target, os.W_OK | os.X_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what} {str(path)!r} cannot be written: {str(target)!r} is read-only or not yours. "
                         f"Choose a writable place.")
    return path


# --- collect -----------------------------------------------------------------------------------

def _collect_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--task", action="append", default=[], help="task name (repeatable)")
    parser.add_argument("--suite", action="append", default=[], help="suite name: cw10, mt10, mt40, mt50, mujoco, classic")
    # the flags below set the CollectConfig key of their name; defaults live in the config class only
    parser.add_argument("--policy", help="key policy: expert | random | sb3:PATH[:ALGO]")
    parser.add_argument("--noise", type=float, help="key noise: Gaussian action-noise sigma (0 = none; default 0.1, none for random)")
    parser.add_argument("--episodes", type=int, help="key episodes: episodes per task")
    parser.add_argument("--seed", type=int, help="key seed")
    parser.add_argument("--horizon", type=int, help="key horizon: steps per episode (default: the suite's)")
    parser.add_argument("--out", help="key out: root directory of the datasets (default: $MINARI_DATASETS_PATH)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="key overwrite: replace existing datasets")
    parser.add_argument("--workers", type=int, help="key workers: tasks collected in parallel processes")


def _collect_config():
    from eva_rl.data.collect import CollectConfig

    return CollectConfig


@command("collect", _collect_args, config=_collect_config)
def _collect(args: argparse.Namespace) -> int:
    from eva_rl.config import load_config
    from eva_rl.data.collect import CollectConfig, collect_tasks, datasets_root
    from eva_rl.envs import resolve_tasks

    names = list(args.task) + list(args.suite)
    if not names:
        raise ValueError("Name what to collect: --task reach-v3 (repeatable) or --suite cw10.")
    config_file, overrides = _config_and_overrides(args)
    flags = _flag_overrides(args, ("policy", "noise", "episodes", "seed", "horizon", "out", "overwrite", "workers"))
    config = load_config(CollectConfig, config_file, overrides + flags)
    check_output(datasets_root(config.out), "--out (the datasets' root)", directory=True)
    for summary in collect_tasks(resolve_tasks(names), config):
        print(summary.describe())
    return 0


def _flag_overrides(args: argparse.Namespace, keys: Sequence[str], rename: dict[str, str] | None = None) -> list[str]:
    """`key=value` overrides of the flags given (a flag not given is None and leaves its key alone).

    Values are written as JSON, which YAML reads back exactly (strings stay strings).
    """
    rename = rename or {}
    return [f"{rename.get(dest, dest)}={json.dumps(getattr(args, dest))}"
            for dest in keys if getattr(args, dest) is not None]


# --- pretrain (train owns this block) ------------------------------------------------------------

def _pretrain_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its newest checkpoint")


def _pretrain_config():
    from eva_rl.train import TrainConfig

    return TrainConfig


@command("pretrain", _pretrain_args, config=_pretrain_config)
def _pretrain(args: argparse.Namespace) -> int:
    import logging

    from eva_rl.config import load_config
    from eva_rl.train import TrainConfig, pretrain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config_file, overrides = _config_and_overrides(args)
    overrides += ["resume=true"] if args.resume else []
    config = load_config(TrainConfig, config_file, overrides)
    check_output(config.out_dir, "out_dir", directory=True)
    result = pretrain(config)
    final = result.metrics["final"]
    print(f"pretrained {result.steps} updates in {result.metrics['train_seconds']:.0f} s: final loss "
          f"{final['train_loss']}, success {final['success_rate']} -> {result.out_dir / 'model'}")
    return 0


# --- evaluate (policy owns this block) -----------------------------------------------------------

_EVALUATE_FLAGS = ("model_dir", "tasks", "reference", "episodes", "seed", "num_envs", "horizon", "target_return_from",
                   "json", "video",
                   "video_every", "bf16", "asynchronous", "base", "device", "progress")


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, help="checkpoint directory (not needed with --reference)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of EvaluateConfig, e.g. episodes=20")
    parser.add_argument("--config", default=None, metavar="YAML", help="an EvaluateConfig YAML (flags win over it)")
    # each flag sets the EvaluateConfig key of its name; defaults live in the config class only
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task or suite names (default: the tasks the policy was trained on)")
    parser.add_argument("--reference", choices=["expert", "random"], default=None,
                        help="evaluate a reference agent instead of a model")
    parser.add_argument("--episodes", type=int, help="episodes per task (default 10)")
    parser.add_argument("--seed", type=int, help="env i is seeded seed + i (default 0)")
    parser.add_argument("--num-envs", type=int, help="envs stepped together per task (default 8)")
    parser.add_argument("--horizon", type=int, help="steps per episode (default: the suite's)")
    parser.add_argument("--target-return", action="append", default=[], metavar="[TASK=]VALUE",
                        help="raw target return, for all tasks or one (repeatable; default: the checkpoint's)")
    parser.add_argument("--target-return-from", nargs="+", default=None, metavar="DATASET",
                        help="condition each task on the best return in these datasets (ids or folders)")
    parser.add_argument("--json", default=None, metavar="OUT", help="key json_out: write episodes and aggregates to this JSON file")
    parser.add_argument("--video", default=None, metavar="DIR", help="key video_dir: record each task's first episode as DIR/<task>.mp4")
    parser.add_argument("--video-every", type=int, metavar="N", help="keep every N-th frame of the video")
    parser.add_argument("--bf16", action="store_true", default=None, help="bfloat16 inference")
    parser.add_argument("--async", dest="asynchronous", action="store_true", default=None, help="step the envs in worker processes while the policy acts (same episodes)")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="pretrained checkpoint an adapter MODEL_DIR applies to (default: the one it recorded)")
    parser.add_argument("--device", default=None, help="torch device of the policy (default cpu)")
    parser.add_argument("--progress", action="store_true", default=None, help="show a progress bar")


def _target_return_overrides(items: Sequence[str]) -> list[str]:
    """--target-return VALUE / TASK=VALUE as overrides of target_return / target_returns."""
    overrides, per_task = [], {}
    for item in items:
        task, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--target-return {item!r} is not VALUE or TASK=VALUE (e.g. 4500 or reach-v3=4500).") from None
        if sep:
            per_task[task] = number
        else:
            overrides = [f"target_return={json.dumps(number)}"]
    return overrides + ([f"target_returns={json.dumps(per_task)}"] if per_task else [])


def _evaluate_config():
    from eva_rl.evaluate import EvaluateConfig

    return EvaluateConfig


def _load_evaluate_config(args: argparse.Namespace):
    from eva_rl.config import load_config
    from eva_rl.evaluate import EvaluateConfig

    flags = _flag_overrides(args, _EVALUATE_FLAGS, rename={"json": "json_out", "video": "video_dir"})
    overrides = list(args.overrides)
    if args.model_dir is not None and "=" in args.model_dir and not Path(args.model_dir).exists():
        flags, overrides = [f for f in flags if not f.startswith("model_dir=")], [args.model_dir] + overrides
    return load_config(EvaluateConfig, args.config, overrides + _target_return_overrides(args.target_return) + flags)


@command("evaluate", _evaluate_args, config=_evaluate_config)
def _evaluate(args: argparse.Namespace) -> int:
    from eva_rl.envs import resolve_tasks
    from eva_rl.evaluate import dataset_target_returns, evaluate, evaluate_reference, load_policy

    config = _load_evaluate_config(args)
    if config.json_out:
        check_output(config.json_out, "--json", directory=False)
    if config.video_dir:
        check_output(config.video_dir, "--video", directory=True)
    common = dict(num_envs=config.num_envs, horizon=config.horizon, asynchronous=config.asynchronous,
                  video_dir=config.video_dir, video_every=config.video_every, progress=config.progress)
    if config.reference is not None:
        if not config.tasks:
            raise ValueError("--reference needs --tasks (task or suite names).")
        result = evaluate_reference(config.reference, list(config.tasks), config.episodes, config.seed, **common)
    else:
        from_data = dataset_target_returns(config.target_return_from)
        if config.tasks:  # checked before the policy loads; else once it has named its tasks
            config.targets(resolve_tasks(list(config.tasks)), from_data)
        policy = load_policy(config.model_dir, base=config.base, device=config.device)
        tasks = list(config.tasks) or list(policy.metadata.tasks)
        if not tasks:
            raise ValueError(f"The checkpoint {config.model_dir!r} names no tasks; pass --tasks.")
        result = evaluate(policy, tasks, config.episodes, config.seed, target_returns=config.targets(resolve_tasks(tasks), from_data),
                          bf16=config.bf16, **common)
    print(result.describe())
    if config.json_out:
        print(f"wrote {result.to_json(config.json_out)}")
    return 0


# --- finetune (adapters own this block) ----------------------------------------------------------

def _finetune_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its newest checkpoint")
    parser.add_argument("--merge", action="store_true", help="also write merged/: a standalone checkpoint")


def _finetune_config():
    from eva_rl.finetune import FinetuneConfig

    return FinetuneConfig


@command("finetune", _finetune_args, config=_finetune_config)
def _finetune(args: argparse.Namespace) -> int:
    import logging

    from eva_rl.config import load_config
    from eva_rl.finetune import FinetuneConfig, finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config_file, overrides = _config_and_overrides(args)
    overrides += (["train.resume=true"] if args.resume else []) + (["merge=true"] if args.merge else [])
    config = load_config(FinetuneConfig, config_file, overrides)
    check_output(config.train.out_dir, "train.out_dir", directory=True)
    result = finetune(config)
    metrics, final = result.metrics, result.metrics["final"]
    eva = f", EVA {metrics['eva_seconds']:.1f} s" if metrics.get("eva_seconds") is not None else ""
    print(f"{metrics['method']} on {metrics['task']}: {metrics['trainable_params']} trainable parameters, "
          f"{result.steps} updates in {metrics['train_seconds']:.0f} s{eva}; final loss {final['train_loss']}, "
          f"held-out action error {final['val_action_error']}, success {final['success_rate']} "
          f"-> {result.out_dir / 'adapter'}")
    return 0


# --- experiment, report, quickstart (experiment owns this block) --------------------------------

def _report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs_dir", nargs="+",
                        help="directory of runs (an experiment's out_dir); several, as NAME=DIR or DIR, pool run "
                             "trees of the same grid, each with its own pretrained model (needs --out)")
    parser.add_argument("--out", default=None, help="where to write the report (default: RUNS_DIR/report)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--fraction", type=float, default=None,
                        help="steps to reach this share of a run's final success (default 0.9)")


@command("report", _report_args)
def _report(args: argparse.Namespace) -> int:
    from eva_rl.report import write_report

    trees = _run_trees(args.runs_dir)
    if len(trees) > 1 and args.out is None:
        raise ValueError(f"Pooling {len(trees)} run trees needs --out: the report's directory, e.g. "
                         f"--out runs/pooled-report.")
    runs = trees if len(trees) > 1 else next(iter(trees.values()))
    check_output(args.out or Path(runs) / "report", "--out (the report's directory)", directory=True)
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}.")
    fraction = {} if args.fraction is None else {"fraction": args.fraction}
    result = write_report(runs, args.out, n_bootstrap=args.bootstrap, plots=not args.no_plots, **fraction)
    print(result.markdown)
    print(f"Report written to {result.out_dir}")
    return 0


def _run_trees(arguments: Sequence[str]) -> dict[str, Path]:
    """{name: directory} of `eva-rl report`'s NAME=DIR or DIR arguments (a bare DIR is named by its folder)."""
    trees: dict[str, Path] = {}
    for argument in arguments:
        name, sep, folder = argument.partition("=")
        if Path(argument).is_dir() or os.sep in name:  # a folder whose name holds "=" is a DIR
            sep = ""
        path = Path(folder if sep else argument)
        name = name if sep else path.resolve().name
        if not name or name in trees:
            raise ValueError(f"Run trees need distinct names; {argument!r} gives "
                             f"{'an empty name' if not name else repr(name) + ' twice'}. Name each as NAME=DIR.")
        trees[name] = path
    return trees


def _experiment_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: a process per run on this machine; ray: a Ray task per run")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once (local backend; default: cores // finetune.cpus_per_run)")
    parser.add_argument("--address", default=None, help="Ray cluster address (ray backend; default: a local instance)")
    parser.add_argument("--overwrite", action="store_true",
                        help="runs made by a different config move to _replaced/ and run again")


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="experiment YAML (a path, or a name in configs/: quickstart.yaml, cw10-cpu.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.seeds=[0,1]")
    _experiment_backend_args(parser)
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def _run_experiment_and_report(config_name: str, overrides: list[str], args: argparse.Namespace,
                               report: bool = True):
    from eva_rl.experiment import StageFailed, config_path, load_experiment, run_experiment
    from eva_rl.report import write_report

    path = config_path(config_name)
    config = load_experiment(path, overrides)
    check_output(config.out_dir, "out_dir", directory=True)
    if report:
        check_output(config.report_dir or Path(config.out_dir) / "report", "report_dir", directory=True)
    if config.collect.datasets_dir and config.collect.enabled:
        check_output(config.collect.datasets_dir, "collect.datasets_dir", directory=True)
    try:
        result = run_experiment(config, backend=args.backend, workers=args.workers, address=args.address,
                                overwrite=args.overwrite, yaml_path=path)
    except StageFailed as exc:
        print(f"eva-rl {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for failed in result.failed:
        print(f"FAILED {failed.name}: {(failed.error or '').strip().splitlines()[-1:]}", file=sys.stderr)
    for busy in (r for r in result.missing if r.status == "busy"):
        print(f"MISSING {busy.name}: {busy.error} (another command); run this one again when it has finished",
              file=sys.stderr)
    made = None
    if report and any(r.status != "failed" for r in result.runs):
        # this config's runs only: another config may share the out_dir (cw10-cpu-lite in cw10-cpu's)
        made = write_report(result.out_dir, config.report_dir or result.out_dir / "report",
                            run_dirs=[result.out_dir / "runs" / r.name for r in result.runs])
    return result, made


def _experiment_config():
    from eva_rl.experiment import ExperimentConfig

    return ExperimentConfig


@command("experiment", _experiment_args, config=_experiment_config)
def _experiment(args: argparse.Namespace) -> int:
    if args.config is None:
        raise ValueError("Name the experiment's YAML: eva-rl experiment CONFIG (e.g. quickstart.yaml); "
                         "eva-rl experiment --print-config writes every key with its default.")
    result, report = _run_experiment_and_report(args.config, args.overrides, args, report=not args.no_report)
    if report is not None:
        print(report.markdown)
        print(f"Report: {report.out_dir / 'report.md'}")
    print(f"Runs: {result.out_dir / 'runs'}  (tensorboard --logdir {result.out_dir})")
    return 1 if result.failed or result.missing else 0


def _quickstart_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of configs/quickstart.yaml")
    _experiment_backend_args(parser)


@command("quickstart", _quickstart_args)
def _quickstart(args: argparse.Namespace) -> int:
    import time

    from eva_rl.report import summary_table

    start = time.perf_counter()
    result, report = _run_experiment_and_report("quickstart.yaml", args.overrides, args)
    print()
    if report is not None:
        print(summary_table(report))
        print("(mean ± standard error over runs; training loss and action error are final values, lower is better)")
        print(f"Full report (tables, CIs, paired differences): {report.out_dir / 'report.md'}")
        print(f"Plots: {', '.join(str(p) for p in report.files if p.suffix == '.png')}")
    print(f"Tensorboard: tensorboard --logdir {result.out_dir}")
    print(f"Quickstart took {time.perf_counter() - start:.0f} s.")
    return 1 if result.failed or result.missing else 0



# --- expert, import (hub and experts own this block) ---------------------------------------------

def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts such as 100000,300000, got {text!r}") from None


def _expert_args(parser: argparse.ArgumentParser) -> None:
    parser.description = ("train a Stable-Baselines3 SAC expert for a Gymnasium task with the RL Zoo's "
                          "hyperparameters; its zips feed collect --policy sb3:PATH")
    parser.add_argument("task", help="Gymnasium task named in envs/ (e.g. Hopper-v5, Pendulum-v1)")
    parser.add_argument("--out", required=True, help="directory of the zips, the log and the resume state")
    parser.add_argument("--steps", type=int, default=None, help="env steps in all (default: the RL Zoo's)")
    parser.add_argument("--save-at", type=_int_list, default=(), metavar="N,N,...",
                        help="also snapshot at these steps, e.g. 100000,300000 (an early one = a medium policy)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N", help="also snapshot every N steps")
    parser.add_argument("--eval-episodes", type=int, default=5, help="deterministic episodes scored per snapshot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--resume", action="store_true", help="continue from the latest snapshot in --out")


@command("expert", _expert_args)
def _expert(args: argparse.Namespace) -> int:
    from eva_rl.data.experts import ExpertConfig, train_expert

    result = train_expert(ExpertConfig(task=args.task, out=args.out, steps=args.steps, save_at=args.save_at,
                                       save_every=args.save_every, eval_episodes=args.eval_episodes,
                                       seed=args.seed, resume=args.resume, threads=args.threads))
    print(result.describe())
    return 0


def _import_args(parser: argparse.ArgumentParser) -> None:
    parser.description = ("turn a plain transformers DecisionTransformerModel (a directory or a Hugging Face Hub id) "
                          "into an eva-rl checkpoint that evaluate and finetune read")
    parser.add_argument("source", help="model directory, or Hub model id ORG/NAME (from the HF cache; HF_HUB_OFFLINE respected)")
    parser.add_argument("--task", required=True, help="task the model acts in (its dims are checked against the env)")
    parser.add_argument("--out", required=True, help="directory of the eva-rl checkpoint to write")
    parser.add_argument("--stats-from", nargs="+", default=None, metavar="DATASET",
                        help="Minari dataset ids or paths the model was trained on (state mean/std, return scale)")
    parser.add_argument("--metadata", default=None, metavar="FILE",
                        help="JSON/YAML with state_mean, state_std, return_scale[, target_return] (e.g. from a model card)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="steps of context the model was trained with (default: config.json's max_length, else 20)")
    parser.add_argument("--target-return", type=float, default=None, help="raw return to condition on")


@command("import", _import_args)
def _import(args: argparse.Namespace) -> int:
    from eva_rl.hub import import_model

    result = import_model(args.source, args.task, args.out, stats_from=args.stats_from, metadata_file=args.metadata,
                          context_length=args.context_length, target_return=args.target_return)
    print(result.describe())
    return 0


# What a user can cause (bad paths, keys, values, outputs): one line. Anything else is a bug in
# eva-rl or a dependency and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

SUMMARIES = {
    "collect": "collect behaviour data (scripted expert + noise, SB3 model, random) into Minari datasets",
    "pretrain": "pretrain a Decision Transformer on one or many tasks' datasets",
    "evaluate": "evaluate a checkpoint, a fine-tuned adapter or a reference agent on tasks or suites",
    "finetune": "fine-tune a pretrained checkpoint on a task with fft, lora, dora, pissa, olora, adalora, eva or eva_dora",
    "report": "tables and plots from a directory of runs",
    "experiment": "run a grid of collect / pretrain / finetune runs, locally or on Ray",
    "expert": "train a Stable-Baselines3 SAC expert (RL Zoo hyperparameters) whose zips feed collect --policy sb3:PATH",
    "import": "turn a plain or published Decision Transformer (folder or Hub id) into an eva-rl checkpoint",
    "quickstart": "the whole pipeline at toy scale in a few minutes (configs/quickstart.yaml)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eva-rl", description="Fine-tune pretrained Decision Transformers offline with EVA-initialised "
                                   "adapters, and evaluate them on Gymnasium and Meta-World tasks.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        command_parser = sub.add_parser(name, help=SUMMARIES.get(name), description=SUMMARIES.get(name))
        # also accepted after the command (eva-rl evaluate ... --debug); SUPPRESS keeps the top-level value
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help="show full tracebacks for user errors")
        if spec.config is not None:
            command_parser.add_argument("--print-config", action="store_true",
                                        help="write every config key with its default and its meaning (YAML), and exit")
        spec.add_args(command_parser)
    args = parser.parse_args(argv)
    spec = COMMANDS[args.command]
    if getattr(args, "print_config", False):
        from eva_rl.config import config_yaml

        print(f"# eva-rl {args.command}: every key with its default; a YAML of any of them, or key=value "
              f"overrides, set them.\n{config_yaml(spec.config())}", end="")
        return 0
    try:
        return spec.run(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"eva-rl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"eva-rl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
