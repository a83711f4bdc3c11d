"""Fine-tune a pretrained Decision Transformer on a new task's data with one method (`eva-rl finetune`).

    checkpoint + task dataset -> method (PEFT adapter; EVA init if the method needs it)
        -> train.train (same loop as pretraining) -> adapter/, merged/ (optional), metrics.json

The task's data is normalised with the checkpoint's statistics (the network was trained on
them), never its own. EVA's batches come from the training split only (the validation split
stays held out; the `train.data.episodes` subset where one is set) and are drawn with a
generator seeded by `eva.seed` alone. Under torchrun the process group is joined before EVA:
each process feeds its share of every batch, EVA pools the statistics, and every process ends
with the components one process computes on the whole batches.

Run directory (`train.out_dir`):
    config.yaml             the resolved FinetuneConfig (reloads with load_config)
    eva/                    EVA's components (eva_weights.safetensors), reused when a run resumes with the
                            same EVA inputs (recorded in the file's metadata)
    eva_report.json, eva_ranks.png   EVA's ranks, explained variance, convergence, seconds
    tb/, checkpoints/       as in train.py
    adapter/                PeftModel.from_pretrained(base, adapter/) + eva_rl_adapter.json
    merged/                 with merge=true: a standalone checkpoint (policy save_pretrained format)
    metrics.json            written last (train.py's format, kind "finetune")
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import eva_rl
from eva_rl.adapters import methods
from eva_rl.adapters.eva import BACKENDS, TOKEN_KINDS, EvaReport, eva_state_dict
from eva_rl import rundir
from eva_rl.config import config_to_dict, save_config
from eva_rl.distributed import Dist, device_type, init_distributed, resolve_device, shutdown
from eva_rl.storage import atomic_path
from eva_rl.train import DataConfig, OptimConfig, PolicySection, RunInfo, TrainConfig, TrainResult, split_data, train

log = logging.getLogger(__name__)
eva_rl._make_callable(__name__)  # so that eva_rl.finetune(...) calls finetune() below


@dataclass(frozen=True)
class EvaSection:
    # "native" (this project's EVA) or "peft" (PEFT's get_eva_state_dict with DT token masks).
    backend: str = "native"
    # Each matrix offers rank * rho components; the top (matrices * rank) by explained variance are kept.
    rho: float = 1.0
    # Cosine between consecutive batches' components at which a component has converged.
    tau: float = 0.99
    # Token kinds whose inputs feed EVA: any of return, state, action.
    tokens: tuple[str, ...] = ("state", "action")
    # Windows per EVA batch (each window is K steps, 3K tokens).
    batch_size: int = 64
    # Most batches EVA may use; matrices not converged by then are reported.
    max_batches: int = 100
    # Seeds the windows EVA samples (the same on every process).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"eva.backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.rho < 1.0:
            raise ValueError(f"eva.rho must be >= 1 (1 = uniform ranks), got {self.rho}.")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"eva.tau must be in (0, 1], got {self.tau}.")
        if not self.tokens or set(self.tokens) - set(TOKEN_KINDS):
            raise ValueError(f"eva.tokens must be a non-empty subset of {list(TOKEN_KINDS)}, got {list(self.tokens)}.")
        if self.batch_size < 1:
            raise ValueError(f"eva.batch_size must be >= 1, got {self.batch_size}.")
        if self.max_batches < 2:
            raise ValueError(f"eva.max_batches must be >= 2 (convergence compares batches), got {self.max_batches}.")


def _default_train() -> TrainConfig:
    # Fine-tuning defaults: a held-out split for the action error, evaluation during the run
    # from step 0 (the pretrained policy, the baseline every method must beat).
    return TrainConfig(data=DataConfig(val_fraction=0.2), optim=OptimConfig(lr=1e-3, warmup_steps=100),
                       steps=1000, eval_every=500, eval_steps=(0,), eval_episodes=10, val_every=100, log_every=50,
                       checkpoint_every=250, out_dir="runs/finetune")


@dataclass(frozen=True)
class FinetuneConfig:
    # Pretrained checkpoint: an eva-rl policy dir, or a plain DecisionTransformerModel dir (see state_mean).
    checkpoint: str = ""
    # Fine-tuning method: fft, lora, dora, pissa, olora, adalora, eva, eva_dora.
    method: str = "eva"
    # Adapter rank r (AdaLoRA: the average rank it prunes to; fft ignores it).
    rank: int = 8
    # LoRA alpha; the adapter's output is scaled by alpha / r. None = rank (scaling 1).
    alpha: float | None = None
    # Dropout on the adapter's input.
    dropout: float = 0.0
    # Adapted matrices, as module-name suffixes (default: every attention and MLP matrix of the blocks).
    target_modules: tuple[str, ...] = methods.DEFAULT_TARGET_MODULES
    # Modules trained in full next to the adapter (e.g. predict_action); none by default.
    modules_to_save: tuple[str, ...] = ()
    # Also write merged/: the adapter folded into the weights, a standalone checkpoint.
    merge: bool = False
    # Plain DecisionTransformerModel checkpoints only: the state normalisation it was trained with
    # (state_dim values each); empty = computed from the fine-tuning data.
    state_mean: tuple[float, ...] = ()
    state_std: tuple[float, ...] = ()
    # Context length K a plain checkpoint was trained with (an eva-rl checkpoint's own K replaces
    # it in the run's resolved config.yaml).
    context_length: int = 20
    # EVA's settings (methods eva and eva_dora).
    eva: EvaSection = field(default_factory=EvaSection)
    # AdaLoRA's settings (method adalora): orthogonality penalty weight and rank schedule.
    adalora: methods.AdaLoraOptions = field(default_factory=methods.AdaLoraOptions)
    # The training loop: data.paths = the task's dataset(s). Its policy section must stay unset: the
    # architecture comes from the checkpoint.
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        methods.get_method(self.method)  # unknown method: lists the known ones
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (or null for alpha = rank), got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one module suffix, e.g. c_attn.")
        if len(self.state_mean) != len(self.state_std):
            raise ValueError(f"state_mean ({len(self.state_mean)} values) and state_std ({len(self.state_std)}) "
                             f"must have the same length, or both be empty.")
        if self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}.")
        policy_keys = [f"train.policy.{name}" for name in ("preset", *PolicySection.OVERRIDABLE)
                       if getattr(self.train.policy, name) != getattr(PolicySection(), name)]
        if policy_keys:
            raise ValueError(f"{', '.join(policy_keys)} set in a fine-tuning config: the architecture comes from "
                             f"the checkpoint, so remove it (a plain DecisionTransformerModel checkpoint's K "
                             f"is the top-level context_length).")
        if self.method == "adalora":  # before any work: something must be left to prune
            self.adalora.initial_rank(self.rank)
            self.adalora.schedule(self.train.steps)


def load_pretrained(config: FinetuneConfig, dataset: Any) -> nn.Module:
    """The pretrained DecisionTransformerPolicy that config.checkpoint names (eval mode), through
    `eva_rl.policy.load_policy`. A plain DecisionTransformerModel dir gets its normalisation from
    config.state_mean/std, or from `dataset` (raw observations) when those are empty.
    """
    from eva_rl.policy import MissingMetadataError, PolicyMetadata, load_policy

    if not config.checkpoint:
        raise FileNotFoundError("checkpoint is empty; pass the model/ dir of a pretraining run (or a "
                                "DecisionTransformerModel save_pretrained dir).")
    path = Path(config.checkpoint)
    try:
        policy = load_policy(path)
    except MissingMetadataError:
        if config.state_mean:
            mean, std = np.asarray(config.state_mean, np.float32), np.asarray(config.state_std, np.float32)
        else:
            log.info("%s is a plain DecisionTransformerModel: normalising with the fine-tuning data's statistics.", path)
            computed = dataset.with_normalization(None, None)
            mean, std = computed.state_mean, computed.state_std
        metadata = PolicyMetadata(state_mean=mean, state_std=std, return_scale=config.train.data.return_scale)
        policy = load_policy(path, metadata=metadata, context_length=config.context_length)
    if hasattr(policy.model, "peft_config"):
        raise ValueError(f"checkpoint {config.checkpoint!r} is an adapter; fine-tune from a full checkpoint "
                         f"(the pretraining run's model/, or a fine-tuning run's merged/).")
    return policy


def check_fit(policy: nn.Module, dataset: Any) -> None:
    """The checkpoint's state/action widths must be the dataset's (padded) widths."""
    have = (int(dataset.state_dim), int(dataset.act_dim))
    want = (int(policy.config.state_dim), int(policy.config.act_dim))
    if have != want:
        raise ValueError(
            f"The checkpoint takes states of {want[0]} and actions of {want[1]} dims but the dataset has "
            f"{have[0]} and {have[1]} (tasks {list(dataset.task_names)}). Fine-tune on data of the same "
            f"observation/action spaces as the pretraining data, or pretrain a matching checkpoint."
        )
    if len(policy.metadata.state_mean) != have[0]:
        raise ValueError(f"The checkpoint's state normalisation has {len(policy.metadata.state_mean)} values, "
                         f"the dataset's states have {have[0]} dims; set state_mean/state_std to match.")


def task_metadata(policy: nn.Module, dataset: Any) -> Any:
    """The policy's metadata plus the fine-tuning tasks (widths; target return = best return in the data)."""
    meta = policy.metadata
    tasks, obs_dims, act_dims = list(meta.tasks), list(meta.obs_dims), list(meta.act_dims)
    for i, task in enumerate(dataset.task_names):
        if task not in tasks:
            tasks.append(task)
            obs_dims.append(int(dataset.obs_dims[i]))
            act_dims.append(int(dataset.act_dims[i]))
    targets = {**dict(meta.target_returns), **{t: float(dataset.max_return(t)) for t in dataset.task_names}}
    return dataclasses.replace(meta, tasks=tuple(tasks), obs_dims=tuple(obs_dims), act_dims=tuple(act_dims),
                               target_returns=targets)


def _eva_batches(dataset: Any, config: FinetuneConfig, context: int, ddp: Dist = Dist()):
    """EVA's windows: from the training split only (the data.episodes subset where one is set),
    seeded by eva.seed. Every process draws the same eva.batch_size windows and keeps its share
    (rows rank, rank + world_size, ...): EVA pools the shares, so its components do not depend
    on the number of processes."""
    if config.eva.batch_size < ddp.world_size:
        raise ValueError(f"eva.batch_size ({config.eva.batch_size}) is below the number of processes "
                         f"({ddp.world_size}): every process needs windows; raise eva.batch_size.")
    data, _ = split_data(dataset, config.train)
    generator = np.random.default_rng([config.eva.seed, 0xE7A])
    for _ in range(config.eva.max_batches):
        batch = data.sample(config.eva.batch_size, context, generator=generator)  # (B, K, ...) each
        yield {key: value[ddp.rank::ddp.world_size] for key, value in batch.items()}


def run_eva(policy: nn.Module, dataset: Any, config: FinetuneConfig, out_dir: Path,
            ddp: Dist = Dist()) -> tuple[dict, EvaReport | None]:
    """EVA's components for `policy` (or those a resumed run saved), and the report (None when reused).

    EVA runs on the policy's device; under torchrun (process group joined) every process feeds its
    share of each batch and all end with the same components."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    saved = out_dir / "eva" / "eva_weights.safetensors"
    inputs = _eva_inputs(config)
    if config.train.resume and saved.exists():
        with safe_open(str(saved), framework="pt") as handle:
            same = (handle.metadata() or {}).get("eva_inputs") == inputs
        if same:
            log.info("Reusing EVA components from %s.", saved)
            return load_file(str(saved)), None
        log.info("%s was computed from other EVA inputs (checkpoint, data, rank, targets or eva settings); "
                 "computing it again.", saved)
    weights, report = eva_state_dict(
        policy, _eva_batches(dataset, config, policy.config.context_length, ddp), rank=config.rank, rho=config.eva.rho,
        tau=config.eva.tau, tokens=config.eva.tokens, target_modules=config.target_modules,
        max_batches=config.eva.max_batches, backend=config.eva.backend)
    # a matrix cut off at the batch cap gets a less settled A: say so where a user looks
    (log.warning if report.not_converged else log.info)(report.summary())
    if ddp.main:
        with atomic_path(saved) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata={"eva_inputs": inputs})
        report.save(out_dir)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
        report.log_tensorboard(writer)
        writer.close()
    return weights, report


def check_run_dir(config: FinetuneConfig) -> Path | None:
    """The newest checkpoint of config.train.out_dir to resume from, or None; refuses a directory of
    another run (`eva_rl.rundir.check_run_dir`). The whole config.yaml is compared, not only the
    train section the checkpoints hold: a resumed run needs the method, rank, targets and EVA
    settings it was made with, or the adapter shapes or init would differ."""
    return rundir.check_run_dir(Path(config.train.out_dir), config_to_dict(config), config_to_dict(FinetuneConfig()),
                                config.train.resume, config_file="config.yaml")


def _eva_inputs(config: FinetuneConfig) -> str:
    """What EVA's components depend on, as JSON: saved ones are reused on resume only if it matches
    (a run that died before its first checkpoint may be restarted in its directory with another rank)."""
    return json.dumps({"checkpoint": str(Path(config.checkpoint).resolve()), "rank": config.rank,
                       "target_modules": list(config.target_modules), "eva": dataclasses.asdict(config.eva),
                       "data": list(config.train.data.paths), "val_fraction": config.train.data.val_fraction,
                       "episodes": config.train.data.episodes, "episodes_seed": config.train.data.episodes_seed,
                       "seed": config.train.seed}, sort_keys=True)


def finetune(config: FinetuneConfig) -> TrainResult:
    """Fine-tune config.checkpoint on config.train.data with config.method; see the module docstring.

    Under torchrun the process group is joined first, so that EVA (on the policy's device) pools
    its statistics over every process before the training loop reuses the same group.
    """
    ddp = init_distributed(device_type(config.train.device))
    try:
        return _finetune(config, ddp)
    finally:
        shutdown(ddp)


def _finetune(config: FinetuneConfig, ddp: Dist) -> TrainResult:
    config, policy, dataset = _prepare(config)
    out_dir = Path(config.train.out_dir)
    spec = methods.get_method(config.method)
    policy.to(resolve_device(config.train.device, ddp.local_rank))
    torch.manual_seed(config.train.seed)  # LoRA's random A
    eva_weights, report = None, None
    if spec.needs_eva:
        eva_weights, report = run_eva(policy, dataset, config, out_dir, ddp)
    methods.apply_method(policy, config.method, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                         target_modules=config.target_modules, modules_to_save=config.modules_to_save,
                         total_steps=config.train.steps, eva_weights=eva_weights, adalora=config.adalora)
    info = methods.adapter_info(policy)
    log.info("%s: %d trainable of %d parameters (%.2f%%).", config.method, info.trainable_params,
             info.total_params, 100.0 * info.trainable_params / info.total_params)
    if ddp.main:
        save_config(config, out_dir / "config.yaml")

    def save(trained: nn.Module) -> None:
        # context_length: a plain DecisionTransformerModel base does not record K, and
        # evaluate.load_policy would otherwise rebuild it at the default K
        extra = {"checkpoint": str(Path(config.checkpoint).resolve()), "task": list(dataset.task_names),
                 "metadata": trained.metadata.to_dict(), "context_length": trained.config.context_length}
        methods.save_adapter(trained, out_dir / "adapter", extra=extra)
        if config.merge:
            methods.save_merged(trained, out_dir / "merged")

    eva_seconds = report.seconds if report is not None else _saved_eva_seconds(out_dir)
    task = dataset.task_names[0] if len(dataset.task_names) == 1 else ",".join(dataset.task_names)
    run_info = RunInfo(kind="finetune", task=task, extra={
        "method": config.method, "rank": None if spec.build_config is None else config.rank,
        "eva_seconds": eva_seconds})
    # AdaLoRA's orthogonality penalty: PEFT adds it only to outputs carrying a `.loss`, which the
    # DT's do not, so the training loop adds it (and logs it apart from the action MSE).
    regularizer = (lambda: methods.regularization_loss(policy)) if spec.uses_rank_schedule else None
    return train(config.train, policy=policy, dataset=dataset, on_step=methods.step_hook(policy),
                 run_info=run_info, on_end=save, regularizer=regularizer, defaults=FinetuneConfig().train)


def _prepare(config: FinetuneConfig) -> tuple[FinetuneConfig, nn.Module, Any]:
    """(the resolved config, the pretrained policy with the task's metadata, the task's data in the
    policy's normalisation), after every check that needs no heavy work."""
    from eva_rl.data.trajectories import load_trajectories

    if not config.train.data.paths:
        raise ValueError("train.data.paths is empty: name the fine-tuning task's dataset(s), e.g. "
                         "train.data.paths='[eva-rl/push-v3-expert-v0]'.")
    raw = load_trajectories(list(config.train.data.paths), return_scale=config.train.data.return_scale,
                            download=config.train.data.download)
    policy = load_pretrained(config, raw)
    check_fit(policy, raw)
    config = resolved_config(config, policy)
    check_run_dir(config)  # before any work or write: a refused run leaves the old run's files as they were
    meta = policy.metadata
    dataset = raw.with_normalization(np.asarray(meta.state_mean, np.float32), np.asarray(meta.state_std, np.float32),
                                     meta.return_scale)
    policy.metadata = task_metadata(policy, dataset)
    methods.check_targets(policy, config.method, config.rank, config.target_modules,
                          config.modules_to_save)  # before any work
    return config, policy, dataset


def resolved_config(config: FinetuneConfig, policy: nn.Module) -> FinetuneConfig:
    """`config` with what the run really uses in place of defaults: the checkpoint's context length
    and return scale (an eva-rl checkpoint carries its own), so config.yaml says what was used."""
    data = dataclasses.replace(config.train.data, return_scale=float(policy.metadata.return_scale))
    return dataclasses.replace(config, context_length=int(policy.config.context_length),
                               train=dataclasses.replace(config.train, data=data))


def _saved_eva_seconds(out_dir: Path) -> float | None:
    path = out_dir / "eva_report.json"
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else None
