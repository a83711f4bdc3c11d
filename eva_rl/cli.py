"""The `eva-rl` command: parses arguments, loads a config, calls one function per subcommand.

Every subcommand's work lives in the module named after its pipeline step; this file only
translates the command line into that call, and turns user errors into one clean message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args) -> exit code` as the subcommand `name` whose arguments `add_args` declares."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (add_args, run)
        return run
    return register


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")


# --- collect -----------------------------------------------------------------------------------

def _collect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", default=[], help="task name (repeatable)")
    parser.add_argument("--suite", action="append", default=[], help="suite name: cw10, mt10, mt40, mt50, mujoco, classic")
    parser.add_argument("--policy", default="expert", help="expert | random | sb3:PATH[:ALGO]")
    parser.add_argument("--noise", type=float, default=0.1, help="Gaussian action-noise sigma added to the policy's actions (0 = none)")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--horizon", type=int, default=None, help="steps per episode (default: the suite's)")
    parser.add_argument("--out", default=None, help="root directory of the datasets (default: $MINARI_DATASETS_PATH)")
    parser.add_argument("--overwrite", action="store_true", help="replace datasets that already exist")
    parser.add_argument("--workers", type=int, default=1, help="tasks collected in parallel processes")


@command("collect", _collect_args)
def _collect(args: argparse.Namespace) -> int:
    from eva_rl.data.collect import CollectConfig, collect_tasks
    from eva_rl.envs import resolve_tasks

    names = list(args.task) + list(args.suite)
    if not names:
        raise ValueError("Name what to collect: --task reach-v3 (repeatable) or --suite cw10.")
    config = CollectConfig(policy=args.policy, noise=args.noise, episodes=args.episodes, seed=args.seed,
                           horizon=args.horizon, out=args.out, overwrite=args.overwrite,
                           workers=args.workers)
    for summary in collect_tasks(resolve_tasks(names), config):
        print(summary.describe())
    return 0


# --- pretrain (train owns this block) ------------------------------------------------------------

def _pretrain_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its newest checkpoint")


@command("pretrain", _pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    import logging

    from eva_rl.config import load_config
    from eva_rl.train import TrainConfig, pretrain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    result = pretrain(load_config(TrainConfig, args.config, overrides))
    final = result.metrics["final"]
    print(f"pretrained {result.steps} updates in {result.metrics['train_seconds']:.0f} s: final loss "
          f"{final['train_loss']}, success {final['success_rate']} -> {result.out_dir / 'model'}")
    return 0


# --- evaluate (policy owns this block) -----------------------------------------------------------

def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, help="checkpoint directory (not needed with --reference)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task or suite names (default: the tasks the policy was trained on)")
    parser.add_argument("--reference", choices=["expert", "random"], default=None,
                        help="evaluate a reference agent instead of a model")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="env i is seeded seed + i")
    parser.add_argument("--num-envs", type=int, default=8, help="envs stepped together per task")
    parser.add_argument("--horizon", type=int, default=None, help="steps per episode (default: the suite's)")
    parser.add_argument("--target-return", action="append", default=[], metavar="[TASK=]VALUE",
                        help="raw target return, for all tasks or one (repeatable; default: the checkpoint's)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write episodes and aggregates to this JSON file")
    parser.add_argument("--video", default=None, metavar="DIR", help="record each task's first episode as DIR/<task>.mp4")
    parser.add_argument("--video-every", type=int, default=4, metavar="N", help="keep every N-th frame of the video")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 inference")
    parser.add_argument("--async", dest="asynchronous", action="store_true", help="one process per env")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="pretrained checkpoint an adapter MODEL_DIR applies to (default: the one it recorded)")
    parser.add_argument("--device", default="cpu", help="torch device of the policy")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def _parse_target_returns(items: Sequence[str]) -> float | dict[str, float] | None:
    if not items:
        return None
    per_task: dict[str, float] = {}
    for item in items:
        task, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--target-return {item!r} is not VALUE or TASK=VALUE (e.g. 4500 or reach-v3=4500).") from None
        if not sep:
            if len(items) > 1:
                raise ValueError("Give either one --target-return VALUE for all tasks, or TASK=VALUE per task.")
            return number
        per_task[task] = number
    return per_task


@command("evaluate", _evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    from eva_rl.evaluate import evaluate, evaluate_reference, load_policy

    common = dict(num_envs=args.num_envs, horizon=args.horizon, asynchronous=args.asynchronous,
                  video_dir=args.video, video_every=args.video_every, progress=args.progress)
    if args.reference is not None:
        if args.model_dir is not None:
            raise ValueError("Give either MODEL_DIR or --reference, not both.")
        if not args.tasks:
            raise ValueError("--reference needs --tasks (task or suite names).")
        result = evaluate_reference(args.reference, args.tasks, args.episodes, args.seed, **common)
    else:
        if args.model_dir is None:
            raise ValueError("Name the checkpoint to evaluate (eva-rl evaluate MODEL_DIR) or pass --reference expert|random.")
        policy = load_policy(args.model_dir, base=args.base, device=args.device)
        tasks = args.tasks or list(policy.metadata.tasks)
        if not tasks:
            raise ValueError(f"The checkpoint {args.model_dir!r} names no tasks; pass --tasks.")
        result = evaluate(policy, tasks, args.episodes, args.seed, target_returns=_parse_target_returns(args.target_return),
                          bf16=args.bf16, **common)
    print(result.describe())
    if args.json:
        print(f"wrote {result.to_json(args.json)}")
    return 0


# --- finetune (adapters own this block) ----------------------------------------------------------

def _finetune_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its newest checkpoint")
    parser.add_argument("--merge", action="store_true", help="also write merged/: a standalone checkpoint")


@command("finetune", _finetune_args)
def _finetune(args: argparse.Namespace) -> int:
    import logging

    from eva_rl.config import load_config
    from eva_rl.finetune import FinetuneConfig, finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config_file, overrides = args.config, list(args.overrides)
    if config_file is not None and "=" in config_file and not config_file.endswith((".yaml", ".yml")):
        config_file, overrides = None, [config_file] + overrides  # only key=value overrides were given
    overrides += (["train.resume=true"] if args.resume else []) + (["merge=true"] if args.merge else [])
    result = finetune(load_config(FinetuneConfig, config_file, overrides))
    metrics, final = result.metrics, result.metrics["final"]
    eva = f", EVA {metrics['eva_seconds']:.1f} s" if metrics.get("eva_seconds") is not None else ""
    print(f"{metrics['method']} on {metrics['task']}: {metrics['trainable_params']} trainable parameters, "
          f"{result.steps} updates in {metrics['train_seconds']:.0f} s{eva}; final loss {final['train_loss']}, "
          f"held-out action error {final['val_action_error']}, success {final['success_rate']} "
          f"-> {result.out_dir / 'adapter'}")
    return 0


# --- experiment, report, quickstart (experiment owns this block) --------------------------------

def _report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs_dir", help="directory of runs (an experiment's out_dir)")
    parser.add_argument("--out", default=None, help="where to write the report (default: RUNS_DIR/report)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--no-plots", action="store_true", help="tables only")


@command("report", _report_args)
def _report(args: argparse.Namespace) -> int:
    from eva_rl.report import write_report

    result = write_report(args.runs_dir, args.out, n_bootstrap=args.bootstrap, plots=not args.no_plots)
    print(result.markdown)
    print(f"Report written to {result.out_dir}")
    return 0


def _experiment_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: a process per run on this machine; ray: a Ray task per run")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once (local backend; default: cores // finetune.cpus_per_run)")
    parser.add_argument("--address", default=None, help="Ray cluster address (ray backend; default: a local instance)")
    parser.add_argument("--overwrite", action="store_true",
                        help="runs made by a different config move to _replaced/ and run again")


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (a path, or a name in configs/: quickstart.yaml, cw10-cpu.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.seeds=[0,1]")
    _experiment_backend_args(parser)
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def _run_experiment_and_report(config_name: str, overrides: list[str], args: argparse.Namespace,
                               report: bool = True):
    from eva_rl.experiment import StageFailed, config_path, load_experiment, run_experiment
    from eva_rl.report import write_report

    path = config_path(config_name)
    config = load_experiment(path, overrides)
    try:
        result = run_experiment(config, backend=args.backend, workers=args.workers, address=args.address,
                                overwrite=args.overwrite, yaml_path=path)
    except StageFailed as exc:
        print(f"eva-rl {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for failed in result.failed:
        print(f"FAILED {failed.name}: {(failed.error or '').strip().splitlines()[-1:]}", file=sys.stderr)
    made = None
    if report and any(r.status != "failed" for r in result.runs):
        # this config's runs only: another config may share the out_dir (cw10-cpu-lite in cw10-cpu's)
        made = write_report(result.out_dir, config.report_dir or result.out_dir / "report",
                            run_dirs=[result.out_dir / "runs" / r.name for r in result.runs])
    return result, made


@command("experiment", _experiment_args)
def _experiment(args: argparse.Namespace) -> int:
    result, report = _run_experiment_and_report(args.config, args.overrides, args, report=not args.no_report)
    if report is not None:
        print(report.markdown)
        print(f"Report: {report.out_dir / 'report.md'}")
    print(f"Runs: {result.out_dir / 'runs'}  (tensorboard --logdir {result.out_dir})")
    return 1 if result.failed else 0


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
    return 1 if result.failed else 0



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


SUMMARIES = {
    "collect": "collect behaviour data (scripted expert + noise, SB3 model, random) into Minari datasets",
    "pretrain": "pretrain a Decision Transformer on one or many tasks' datasets",
    "evaluate": "evaluate a checkpoint, a fine-tuned adapter or a reference agent on tasks or suites",
    "finetune": "fine-tune a pretrained checkpoint on a task with fft, lora, dora, pissa, olora, adalora, eva or eva_dora",
    "report": "tables and plots from a directory of runs",
    "experiment": "run a grid of collect / pretrain / finetune runs, locally or on Ray",
    "quickstart": "the whole pipeline at toy scale in a few minutes (configs/quickstart.yaml)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eva-rl", description="Fine-tune pretrained Decision Transformers offline with EVA-initialised "
                                   "adapters, and evaluate them on Gymnasium and Meta-World tasks.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=SUMMARIES.get(name), description=SUMMARIES.get(name)))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        if args.debug:
            raise
        print(f"eva-rl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
