"""The offline training loop: one loop for pretraining and fine-tuning a Decision Transformer.

`train(config, policy=..., dataset=..., on_step=...)` runs AdamW with linear warm-up and cosine
decay on the masked action MSE of `policy.loss`, over the parameters that have `requires_grad`
only (fine-tuning freezes the base and passes a PEFT-wrapped policy). It logs to tensorboard,
shows a progress bar, evaluates on the training tasks and measures the action error on a
held-out split every so often, and writes checkpoints atomically so that `resume=True` continues
a killed run to exactly the weights an uninterrupted run reaches (on CPU).
`pretrain(config)` loads the datasets, builds the policy from their dims and a preset, trains,
and saves `model/` in the policy's `save_pretrained` format.

The loop itself is `_loop` (one screen); checkpointing lives in `eva_rl.checkpoint`, process
groups, devices and precision in `eva_rl.distributed`. The module runs past 600 lines because
its configs (a third of it, one documented field at a time) sit beside the loop they configure.

Data parallel: started under `torchrun`, every process samples its own windows (sampler seeded
by (seed, rank)), gradients are averaged by DDP (gloo on CPU, nccl on CUDA), and rank 0 alone
writes checkpoints, logs, evaluations and metrics.

Run directory (`out_dir`):
    config.yaml          the resolved TrainConfig (pretrain), reloads with load_config
    tb/                  tensorboard events
    checkpoints/step_<n>/  see eva_rl.checkpoint; `latest` names the newest
    model/               the final policy (pretrain)
    metrics.json         written last: its presence means the run finished (eva_rl.rundir.is_finished)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from eva_rl import checkpoint, rundir
from eva_rl.checkpoint import TrainState
from eva_rl.config import config_to_dict, field_comments, save_config
from eva_rl.distributed import (PRECISIONS, Dist, all_mean, autocast, barrier, cpu_supports_bf16, device_type,
                                init_distributed, is_main_process, resolve_device, resolve_precision, shutdown)
from eva_rl.policy import PolicyConfig
from eva_rl.storage import write_text_atomic

log = logging.getLogger(__name__)



# --- config ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    # Minari dataset ids (`eva-rl/reach-v3-expert-v0`) or dataset directories; all are trained on.
    paths: tuple[str, ...] = ()
    # Returns-to-go are divided by this before they enter the model (raw units / return_scale).
    return_scale: float = 1000.0
    # Fraction of each task's episodes held out to measure the validation action error (0 = none).
    val_fraction: float = 0.0
    # Sample windows so that every task is equally likely (else proportional to its steps).
    balance_tasks: bool = False
    # Training episodes per task: a seeded subset drawn after the validation split, so the held-out
    # episodes are the same for every size (null = all; the low-data regime sweeps it).
    episodes: int | None = None
    # Seed of that subset (null = the run's seed: each seed sees its own subset, and every method at
    # a seed the same one).
    episodes_seed: int | None = None
    # Fetch Minari dataset ids that are not on disk with Minari's own download (needs the network);
    # false: a missing id is an error saying how to get it.
    download: bool = False

    def __post_init__(self) -> None:
        if not self.return_scale > 0:
            raise ValueError(f"data.return_scale must be > 0, got {self.return_scale}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.episodes is not None and self.episodes < 1:
            raise ValueError(f"data.episodes must be >= 1 or null (all), got {self.episodes}.")


def _policy_section() -> type:
    """PolicySection: a preset name plus every architecture field of PolicyConfig as an optional
    override (None keeps the preset's value). Derived from PolicyConfig, where each field is
    documented, so the two cannot drift apart; state_dim/act_dim come from the data."""
    hints = typing.get_type_hints(PolicyConfig)
    overridable = [f.name for f in dataclasses.fields(PolicyConfig) if f.name not in ("state_dim", "act_dim")]

    def overrides(self: Any) -> dict[str, Any]:
        """The fields set here, as keyword overrides for `PolicyConfig.from_preset`."""
        return {name: getattr(self, name) for name in overridable if getattr(self, name) is not None}

    fields = [("preset", str, field(default="small"))]
    fields += [(name, typing.Optional[hints[name]], field(default=None)) for name in overridable]
    documented = field_comments(PolicyConfig)
    comments = {"preset": "PolicyConfig preset: tiny (tests), small (CPU experiments) or paper."}
    comments |= {name: f"{documented[name]} (null = the preset's)".lstrip() for name in overridable}
    section = dataclasses.make_dataclass("PolicySection", fields, frozen=True,
                                         namespace={"overrides": overrides, "OVERRIDABLE": tuple(overridable),
                                                    "FIELD_COMMENTS": comments})
    section.__module__ = __name__  # pickling and OmegaConf find the class here
    return section


# Architecture of a policy train/pretrain builds: `preset` (a PolicyConfig preset: tiny, small,
# paper) and PolicyConfig's fields hidden_size, n_layer, n_head, context_length, max_ep_len,
# dropout, activation, action_tanh, each overriding the preset's value when set.
PolicySection = _policy_section()


@dataclass(frozen=True)
class OptimConfig:
    # Peak learning rate of AdamW, reached at the end of warm-up.
    lr: float = 1e-4
    # Decoupled weight decay on matrices; biases, LayerNorm and embedding tables get none.
    weight_decay: float = 0.01
    # Updates of linear warm-up from lr/warmup_steps to lr; cosine decay follows.
    warmup_steps: int = 1000
    # The cosine decays to lr * min_lr_ratio at the last update.
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this (0 = no clipping; the norm is still logged).
    grad_clip: float = 0.25
    # AdamW's (beta1, beta2).
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {tuple(self.betas)}.")


@dataclass(frozen=True)
class TrainConfig:
    # Datasets to train on and how to read them.
    data: DataConfig = field(default_factory=DataConfig)
    # Architecture (used when train/pretrain builds the policy; ignored when one is passed in).
    policy: PolicySection = field(default_factory=PolicySection)
    # Optimizer and learning-rate schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Optimizer updates in the whole run.
    steps: int = 10_000
    # Windows per update, per process (the global batch under torchrun is batch_size * world size).
    batch_size: int = 64
    # Seeds model init, dropout (seed + rank) and the window sampler ((seed, rank)).
    seed: int = 0
    # "auto" (CUDA if available), "cpu", "cuda" or "cuda:N". Under torchrun CUDA means cuda:LOCAL_RANK.
    device: str = "auto"
    # "auto" = bf16 autocast on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else fp32.
    precision: str = "auto"
    # Run the loss through torch.compile (faster on CUDA after a warm-up; off by default).
    compile: bool = False
    # Updates between loss/lr/grad-norm/throughput log points (also the progress bar's refresh).
    log_every: int = 100
    # Updates between evaluations on the training tasks (0 = none but eval_steps). Whenever any
    # evaluation is configured, the last update is evaluated too.
    eval_every: int = 0
    # More points of the success curve, as updates done (0 = the policy before any update); points
    # beyond `steps` are skipped. Every method and seed is evaluated on the same starts (eval_seed).
    eval_steps: tuple[int, ...] = ()
    # Episodes per task in each evaluation.
    eval_episodes: int = 10
    # Parallel envs in each evaluation.
    eval_num_envs: int = 8
    # Seed of the evaluation envs: fixed, so every run and method meets the same task variants.
    eval_seed: int = 1_000_000
    # Tasks to evaluate on (empty = the tasks the dataset holds).
    eval_tasks: tuple[str, ...] = ()
    # Episode length in evaluation (None = the task's own horizon).
    eval_horizon: int | None = None
    # Updates between validation action-error measurements (needs data.val_fraction > 0; 0 = only at the end).
    val_every: int = 500
    # Held-out windows per validation measurement = val_batches * batch_size (fixed windows, same each time).
    val_batches: int = 8
    # Updates between checkpoints (0 = no checkpoints).
    checkpoint_every: int = 1000
    # Checkpoints kept on disk (older ones are deleted once a newer one is complete).
    keep_checkpoints: int = 2
    # Run directory (created; see the module docstring for its layout).
    out_dir: str = "runs/pretrain"
    # Continue from the newest good checkpoint in out_dir (start fresh if there is none).
    resume: bool = False
    # Show a tqdm progress bar (rank 0 only).
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "log_every": self.log_every,
                    "eval_episodes": self.eval_episodes, "eval_num_envs": self.eval_num_envs,
                    "val_batches": self.val_batches, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        non_negative = {"steps": self.steps, "eval_every": self.eval_every, "val_every": self.val_every,
                        "checkpoint_every": self.checkpoint_every}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if any(step < 0 for step in self.eval_steps):
            raise ValueError(f"eval_steps must be updates done (>= 0), got {list(self.eval_steps)}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}.")
        if self.eval_horizon is not None and self.eval_horizon < 1:
            raise ValueError(f"eval_horizon must be >= 1 or null, got {self.eval_horizon}.")
        if not self.out_dir:
            raise ValueError("out_dir must name a directory, got an empty string.")


@dataclass(frozen=True)
class RunInfo:
    """Who this run is, for metrics.json."""

    kind: str = "pretrain"  # "pretrain" | "finetune"
    task: str | None = None  # the fine-tuning task(s), comma-separated
    # more metrics.json fields from the caller (fine-tuning adds method, rank, eva_seconds); the
    # loop writes them as given and knows nothing of what they mean
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a finished `train` returns."""

    policy: nn.Module  # the trained policy (unwrapped: no DDP, no compile)
    metrics: dict  # the metrics.json content
    out_dir: Path  # the run directory
    steps: int  # optimizer updates done (== config.steps)


# --- pieces of the loop ------------------------------------------------------------------------

def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for update number `step` (0-based): linear warm-up, then cosine.

    Warm-up: (step + 1) / warmup_steps, reaching 1 at the last warm-up update. Then a half cosine
    from 1 down to min_lr_ratio at update total_steps - 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the parameters with requires_grad: decay on matrices only.

    Biases, LayerNorm gains and embedding tables (nn.Embedding) get no decay, as in nanoGPT/minGPT:
    shrinking them toward zero only hurts.
    """
    no_decay_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.dim() < 2 or id(param) in no_decay_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `model`'s trainable parameters (see `parameter_groups`) and its warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                                  betas=tuple(optim.betas), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, total_steps, optim.min_lr_ratio))
    return optimizer, scheduler


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class _LossModule(nn.Module):
    """Wraps a policy so that DDP and torch.compile see `policy.loss(batch)` (and the method's
    regularisation term, computed in the same forward so DDP sees its gradients) as the forward."""

    def __init__(self, policy: nn.Module, regularizer: Callable[[], torch.Tensor | None] | None) -> None:
        super().__init__()
        self.policy = policy
        self.regularizer = regularizer

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.policy.loss(batch), self.regularizer() if self.regularizer is not None else None




# --- the loop ----------------------------------------------------------------------------------

class _Log:
    """Tensorboard and the progress bar, on rank 0; every call does nothing on the other ranks."""

    def __init__(self, config: TrainConfig, ddp: Dist, step: int, kind: str, trainable: int, total: int) -> None:
        self.writer = self.bar = None
        if not ddp.main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(str(Path(config.out_dir) / "tb"), purge_step=step if step else None)
        self.scalars({"params/trainable": trainable, "params/total": total}, step)
        self.bar = tqdm(total=config.steps, initial=step, disable=not config.progress, dynamic_ncols=True,
                        desc=kind)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def bar_update(self, steps: int = 0, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.writer is not None:
            self.bar.close()
            self.writer.flush()
            self.writer.close()


@dataclass
class _Run:
    """What stays fixed while the loop runs: the config, where it runs, the data, the outputs."""

    config: TrainConfig
    ddp: Dist
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (None = fp32)
    model: nn.Module  # what the loop calls: policy.loss (+ regulariser) under DDP / torch.compile
    params: list[nn.Parameter]  # the optimised parameters (for clipping)
    train_data: Any  # the training split (a TrajectoryDataset)
    val_batches: list[dict[str, torch.Tensor]]  # fixed held-out windows (empty = no validation)
    eval_tasks: tuple[str, ...]
    context: int  # K
    logger: _Log
    eval_points: frozenset[int] = frozenset()  # evaluation_steps(config)
    window_start: float = 0.0  # perf_counter at the start of the open log window (pauses excluded)

    def sample(self, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch of training windows on the device: (B, K, state_dim) states etc. + (B, act_dim) action_mask."""
        batch = self.train_data.sample(self.config.batch_size, self.context, generator=generator,
                                       balance_tasks=self.config.data.balance_tasks)
        return _to_device(_with_action_mask(batch, self.train_data), self.device)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and checkpoints inside this block do not count as training time."""
        start = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - start


def _loop(run: _Run, state: TrainState) -> None:
    """Updates from state.step to config.steps: sample, forward, loss, backward, clip, step,
    schedule, hooks, log, validation/evaluation, checkpoint."""
    config, optimizer = run.config, state.optimizer
    run.window_start = time.perf_counter()
    while state.step < config.steps:
        batch = run.sample(state.generator)
        optimizer.zero_grad(set_to_none=True)
        with autocast(run.device, run.dtype):
            loss, penalty = run.model(batch)  # masked action MSE averaged over real steps; regulariser or None
        (loss if penalty is None else loss + penalty).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, config.optim.grad_clip or float("inf"))
        optimizer.step()
        state.scheduler.step()
        state.step += 1
        state.loss_sum += loss.detach().float()
        state.window_steps += 1
        if state.hook is not None:
            state.hook(state.step)  # with this update's gradients still in place (AdaLoRA's allocation)
        if state.step % config.log_every == 0 or state.step == config.steps:
            _log_window(run, state, grad_norm, penalty)
        with run.paused():
            if state.step in run.eval_points or (run.val_batches and _validates_at(config, state.step)):
                _measure(run, state, state.step)
            if config.checkpoint_every and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
                _check_finite(state.loss_sum, grad_norm, state.step, run.ddp)  # never save NaN-broken weights
                checkpoint.save_state(Path(config.out_dir) / rundir.CHECKPOINTS_DIR, state, config_to_dict(config),
                                      config.keep_checkpoints, run.ddp)


def _log_window(run: _Run, state: TrainState, grad_norm: torch.Tensor, penalty: torch.Tensor | None) -> None:
    """Close the log window: mean loss over it (all ranks), lr, gradient norm, throughput."""
    step = state.step
    _check_finite(state.loss_sum, grad_norm, step, run.ddp)
    seconds = time.perf_counter() - run.window_start
    state.history["train_seconds"] += seconds
    mean_loss = float(all_mean(state.loss_sum, run.ddp)) / state.window_steps
    state.history["train_loss"].append([step, mean_loss])
    run.logger.scalars({"train/loss": mean_loss, "train/lr": state.scheduler.get_last_lr()[0],
                        "train/grad_norm": float(grad_norm),
                        "train/updates_per_second": state.window_steps / seconds}
                       | ({} if penalty is None else {"train/regularization": float(penalty.detach())}), step)
    run.logger.bar_update(state.window_steps, loss=f"{mean_loss:.4g}")
    if run.ddp.main:
        log.info("step %d: loss %.4g, lr %.3g, grad norm %.3g, %.1f updates/s", step, mean_loss,
                 state.scheduler.get_last_lr()[0], float(grad_norm), state.window_steps / seconds)
    state.loss_sum.zero_()
    state.window_steps, run.window_start = 0, time.perf_counter()


def _measure(run: _Run, state: TrainState, at: int) -> None:
    """Validation and evaluation due at update `at` (rank 0), then every rank waits for it."""
    config, history, policy = run.config, state.history, state.policy
    if run.ddp.main:
        if run.val_batches and _validates_at(config, at):
            error = validation_action_error(policy, run.val_batches, run.device, run.dtype)
            history["val_action_error"].append([at, error])
            run.logger.scalars({"val/action_error": error}, at)
            log.info("step %d: validation action error %.4g", at, error)
        if at in run.eval_points:
            entry = _eval_entry(_evaluate(policy, config, run.eval_tasks), at)
            history["eval"].append(entry)
            run.logger.scalars({f"eval/{key}": entry[key] for key in ("success_rate", "return_mean")}, at)
            run.logger.bar_update(loss=_last(history["train_loss"]), success=entry["success_rate"])
            log.info("step %d: success %.3f +- %.3f, return %.4g over %d episodes", at, entry["success_rate"],
                     entry["success_stderr"], entry["return_mean"], entry["episodes"])
    barrier(run.ddp)


def evaluation_steps(config: TrainConfig) -> list[int]:
    """The updates-done counts at which the policy is evaluated, sorted: eval_steps, multiples of
    eval_every and, when any evaluation is configured, the last update."""
    points = {step for step in config.eval_steps if step <= config.steps}
    if config.eval_every:
        points |= set(range(config.eval_every, config.steps + 1, config.eval_every))
    if points or config.eval_every:
        points.add(config.steps)
    return sorted(points)


def _validates_at(config: TrainConfig, step: int) -> bool:
    """Validation points: before the first update, every val_every updates, and the last one."""
    return step in (0, config.steps) or bool(config.val_every and step % config.val_every == 0)


def _record_start(run: _Run, state: TrainState) -> None:
    """Step-0 points of a fresh run: the training loss on the first batch the loop will train on
    (no update; drawn from a copy of the sampler, dropout under a forked RNG, so the run itself
    is unchanged), then validation and evaluation of the policy before any update."""
    batch = run.sample(copy.deepcopy(state.generator))
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast(run.device, run.dtype):
        loss = state.policy.loss(batch).float()
    start_loss = float(all_mean(loss, run.ddp))
    state.history["train_loss"].append([0, start_loss])
    run.logger.scalars({"train/loss": start_loss}, 0)
    if run.ddp.main:
        log.info("step 0: loss %.4g (before any update)", start_loss)
    _measure(run, state, 0)


def _check_finite(loss_sum: torch.Tensor, grad_norm: torch.Tensor, step: int, ddp: Dist) -> None:
    """Stop (on every rank alike) once a loss or gradient norm is NaN/inf: the weights are broken."""
    values = all_mean(torch.stack([loss_sum.float(), grad_norm.float().to(loss_sum.device)]), ddp)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"Training loss or gradient norm became non-finite by update {step}. Lower optim.lr, "
                         f"keep optim.grad_clip on, or check the dataset for NaN/inf values.")


def train(config: TrainConfig, *, policy: nn.Module | None = None, dataset: Any = None,
          on_step: Callable[[int], None] | None = None, run_info: RunInfo = RunInfo(),
          on_end: Callable[[nn.Module], None] | None = None,
          regularizer: Callable[[], torch.Tensor | None] | None = None,
          defaults: TrainConfig | None = None) -> TrainResult:
    """Train `policy` on `dataset` offline for config.steps updates; write checkpoints, logs, metrics.json.

    policy: a DecisionTransformerPolicy (or a PEFT model wrapping one) with `loss(batch) -> scalar`.
        Only parameters with requires_grad are optimised: freeze what must not train before calling.
        None: built from config.policy and the dataset's dims (seeded by config.seed).
    dataset: a TrajectoryDataset (None: loaded from config.data). With data.val_fraction > 0 it is
        split by whole episodes into train and validation parts.
    on_step: called as on_step(step) after every optimizer update, step = updates done so far
        (1..config.steps), with the gradients of that update still in place (AdaLoRA's
        `update_and_allocate` needs them), before any checkpoint of that step. If it has
        `state_dict()` / `load_state_dict(state)`, its state is checkpointed and restored too.
    run_info: kind/task, and extra fields the caller wants in metrics.json.
    on_end: called with the trained policy on rank 0 before metrics.json is written (save the
        model or adapter there, so that metrics.json's presence means the run is complete).
    regularizer: a term added to the loss for the gradient only (AdaLoRA's orthogonality penalty).
        train/loss and metrics.json's train_loss stay the action MSE, comparable across methods;
        the term is logged as train/regularization.
    defaults: the config this run's keys default to (None: TrainConfig(); fine-tuning's differ). On
        resume, a key the checkpoint's config lacks (saved by an older release) matches at its default.
    """
    ddp = init_distributed(device_type(config.device))
    try:
        return _train(config, policy, dataset, on_step, run_info, on_end, regularizer, defaults, ddp)
    finally:
        shutdown(ddp)


def _train(config: TrainConfig, policy: nn.Module | None, dataset: Any, on_step: Callable[[int], None] | None,
           run_info: RunInfo, on_end: Callable[[nn.Module], None] | None,
           regularizer: Callable[[], torch.Tensor | None] | None, defaults: TrainConfig | None,
           ddp: Dist) -> TrainResult:
    out_dir = Path(config.out_dir)
    device, dtype = _device_and_precision(config, ddp)
    found = check_run_dir(config, defaults)  # before any work: a refused run fails fast
    if dataset is None:
        dataset = load_dataset(config)
    if policy is None:
        policy = build_policy(config, dataset)
    train_data, val_data = split_data(dataset, config)
    context = _context_length(policy)

    policy.to(device).train()
    trainable, total = count_parameters(policy)
    if trainable == 0:
        raise ValueError("No parameter of the policy has requires_grad=True: nothing to train.")
    optimizer, scheduler = build_optimizer(policy, config.optim, config.steps)
    torch.manual_seed(config.seed + ddp.rank)
    state = TrainState(policy, optimizer, scheduler, np.random.default_rng([config.seed, ddp.rank]), device,
                       hook=on_step, loss_sum=torch.zeros((), device=device))
    if found is not None:
        resumed = checkpoint.resume_state(out_dir / rundir.CHECKPOINTS_DIR, state, config_to_dict(config), ddp,
                                          defaults=config_to_dict(defaults or TrainConfig()))
        log.info("Resuming from %s (step %d of %d).", resumed, state.step, config.steps)
    log.info("Trainable parameters: %d of %d (%.2f%%); device %s, precision %s, %d process(es).",
             trainable, total, 100.0 * trainable / total, device, dtype or "fp32", ddp.world_size)
    run = _Run(config, ddp, device, dtype, model=_wrap(policy, config, device, ddp, regularizer),
               params=[p for group in optimizer.param_groups for p in group["params"]], train_data=train_data,
               val_batches=_validation_batches(val_data, config, context),
               eval_tasks=config.eval_tasks or tuple(dataset.task_names), context=context,
               logger=_Log(config, ddp, state.step, run_info.kind, trainable, total),
               eval_points=frozenset(evaluation_steps(config)))
    if state.step == 0:
        _record_start(run, state)
    _loop(run, state)

    metrics = _metrics(config, run_info, trainable, total, state.history,
                       _eval_protocol(config, policy, run.eval_tasks))
    run.logger.close()
    if ddp.main:
        if on_end is not None:
            on_end(policy)
        write_metrics(out_dir / rundir.METRICS_FILE, metrics)
    barrier(ddp)
    return TrainResult(policy=policy, metrics=metrics, out_dir=out_dir, steps=state.step)


def _device_and_precision(config: TrainConfig, ddp: Dist) -> tuple[torch.device, torch.dtype | None]:
    device = resolve_device(config.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_precision(config.precision, device)
    if dtype is not None and device.type == "cpu" and not cpu_supports_bf16():
        log.warning("precision=bf16 on a CPU without native bf16 matmul (AVX512-BF16/AMX): bf16 is emulated "
                    "and several times slower than fp32 here. precision=auto picks fp32 on such CPUs.")
    return device, dtype


def _wrap(policy: nn.Module, config: TrainConfig, device: torch.device, ddp: Dist,
          regularizer: Callable[[], torch.Tensor | None] | None) -> nn.Module:
    """The module the loop calls: `policy.loss` as forward, under DDP and torch.compile when asked."""
    model: nn.Module = _LossModule(policy, regularizer)
    if ddp.world_size > 1:
        # Unused heads (state/return prediction) get no gradient from the action loss.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    return torch.compile(model) if config.compile else model


def _validation_batches(val_data: Any, config: TrainConfig, context: int) -> list[dict[str, torch.Tensor]]:
    """Fixed held-out windows (the same at every measurement, so the curve compares like with like)."""
    if val_data is None:
        return []
    val_generator = np.random.default_rng([config.seed, 1 << 20])
    return [_with_action_mask(val_data.sample(config.batch_size, context, generator=val_generator), val_data)
            for _ in range(config.val_batches)]


def _last(points: list) -> float | None:
    return points[-1][1] if points else None


def _metrics(config: TrainConfig, run_info: RunInfo, trainable: int, total: int, history: dict,
             protocol: dict) -> dict:
    """metrics.json content, in the contract's format."""
    final_eval = history["eval"][-1] if history["eval"] and history["eval"][-1]["step"] == config.steps else {}
    return {
        "kind": run_info.kind, "task": run_info.task, **run_info.extra,
        "seed": config.seed, "trainable_params": trainable, "total_params": total,
        "train_seconds": float(history["train_seconds"]),
        "train_loss": history["train_loss"], "val_action_error": history["val_action_error"],
        "eval": sorted(history["eval"], key=lambda entry: entry["step"]), "eval_protocol": protocol,
        "final": {key: final_eval.get(key)
                  for key in ("success_rate", "success_stderr", "return_mean", "return_stderr", "score_mean",
                              "score_stderr")}
        | {"train_loss": _last(history["train_loss"]), "val_action_error": _last(history["val_action_error"])},
    }


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write metrics.json atomically (see the contract for its fields)."""
    write_text_atomic(Path(path), json.dumps(metrics, indent=1) + "\n")


# --- evaluation and validation -----------------------------------------------------------------

def _eval_entry(result: Any, step: int) -> dict:
    """The metrics.json eval record for one EvalResult: suite aggregates, and per task its
    successes and every episode's success in episode order (for paired and per-episode statistics)."""
    suite, per_task = result.suite, {}
    for task, measures in result.tasks.items():
        records = sorted((r for r in result.episodes if r.task == task), key=lambda r: r.episode)
        successes = [int(bool(r.success)) for r in records]
        per_task[task] = {"success_rate": float(measures["success"]["mean"]), "successes": sum(successes),
                          "episodes": len(records), "return_mean": float(measures["return"]["mean"]),
                          "episode_success": successes}
        if "score" in measures:
            per_task[task]["score_mean"] = float(measures["score"]["mean"])
    entry = {"step": step,
             "success_rate": float(suite["success"]["mean"]), "success_stderr": float(suite["success"]["stderr"]),
             "return_mean": float(suite["return"]["mean"]), "return_stderr": float(suite["return"]["stderr"]),
             "episodes": len(result.episodes), "per_task": per_task}
    if "score" in suite:  # D4RL's normalised return, where the tasks have reference scores
        entry.update(score_mean=float(suite["score"]["mean"]), score_stderr=float(suite["score"]["stderr"]))
    return entry


def _eval_protocol(config: TrainConfig, policy: nn.Module, tasks: tuple[str, ...]) -> dict:
    """How every evaluation of the run was made: the same seed, episodes and targets at each step."""
    steps = evaluation_steps(config)
    targets: dict[str, float] = {}
    if steps:  # the tasks are only resolved (suite names expanded) when something is evaluated
        from eva_rl.envs import resolve_tasks

        known = dict(policy.metadata.target_returns)
        targets = {task: float(known[task]) for task in resolve_tasks(list(tasks)) if task in known}
    return {"seed": config.eval_seed, "episodes": config.eval_episodes, "num_envs": config.eval_num_envs,
            "horizon": config.eval_horizon, "target_returns": targets, "steps": steps}


def _evaluate(policy: nn.Module, config: TrainConfig, tasks: tuple[str, ...]) -> Any:
    from eva_rl.evaluate import evaluate

    was_training = policy.training
    try:
        return evaluate(policy, list(tasks), config.eval_episodes, config.eval_seed,
                        num_envs=config.eval_num_envs, horizon=config.eval_horizon)
    finally:
        policy.train(was_training)


@torch.no_grad()
def validation_action_error(policy: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                            dtype: torch.dtype | None) -> float:
    """Mean masked action MSE of `policy` (eval mode) over fixed held-out `batches`."""
    was_training = policy.training
    policy.eval()
    try:
        total = 0.0
        for batch in batches:
            with autocast(device, dtype):
                total += float(policy.loss(_to_device(batch, device)))
        return total / len(batches)
    finally:
        policy.train(was_training)


def _with_action_mask(batch: dict[str, torch.Tensor], dataset: Any) -> dict[str, torch.Tensor]:
    """Add "action_mask" (B, act_dim): 1 on each window's task's true action dims, from the dataset's
    own task list (a fine-tuning dataset's task ids need not match the pretrained policy's)."""
    widths = torch.as_tensor(dataset.act_dims)[batch["task_ids"]]  # (B,)
    batch["action_mask"] = (torch.arange(dataset.act_dim) < widths[:, None]).float()
    return batch


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# --- building --------------------------------------------------------------------------------

def load_dataset(config: TrainConfig) -> Any:
    """The TrajectoryDataset that config.data names."""
    from eva_rl.data.trajectories import load_trajectories

    if not config.data.paths:
        raise ValueError("data.paths is empty: name the datasets to train on, e.g. "
                         "data.paths='[eva-rl/reach-v3-expert-v0]' or a dataset directory.")
    return load_trajectories(list(config.data.paths), return_scale=config.data.return_scale,
                             download=config.data.download)


def build_policy(config: TrainConfig, dataset: Any) -> nn.Module:
    """A fresh DecisionTransformerPolicy for `dataset` (dims, normalisation, tasks, target returns)."""
    from eva_rl.policy import DecisionTransformerPolicy, PolicyMetadata

    policy_config = PolicyConfig.from_preset(config.policy.preset, state_dim=int(dataset.state_dim),
                                             act_dim=int(dataset.act_dim), **config.policy.overrides())
    longest = int(dataset.timesteps.max()) + 1 if dataset.num_steps else 0
    if longest > policy_config.max_ep_len:
        raise ValueError(f"The data has episodes of {longest} steps but the policy's max_ep_len is "
                         f"{policy_config.max_ep_len}. Set policy.max_ep_len={longest} (or more).")
    metadata = PolicyMetadata.from_dataset(dataset)  # normalisation, tasks, widths, target = best return
    torch.manual_seed(config.seed)
    return DecisionTransformerPolicy(policy_config, metadata)


def _context_length(policy: nn.Module) -> int:
    """K of a policy, also through PEFT wrappers (which forward attribute access to the base)."""
    config = getattr(policy, "config", None)
    if config is not None and hasattr(config, "context_length"):
        return int(config.context_length)
    base = getattr(policy, "base_model", None)
    while base is not None and not hasattr(getattr(base, "config", None), "context_length"):
        base = getattr(base, "model", None)
    if base is None:
        raise ValueError("Cannot find the policy's context_length: pass a DecisionTransformerPolicy "
                         "(or a PEFT model wrapping one).")
    return int(base.config.context_length)


def split_data(dataset: Any, config: TrainConfig) -> tuple[Any, Any | None]:
    """(training split, validation split or None): whole episodes of each task held out by
    data.val_fraction (seeded by config.seed), then data.episodes per task kept for training
    (seeded by data.episodes_seed, else config.seed). Fine-tuning's EVA draws from the same split."""
    train_data, val_data = dataset, None
    if config.data.val_fraction > 0:
        train_data, val_data = dataset.split(config.data.val_fraction, config.seed)
    if config.data.episodes is not None:
        seed = config.seed if config.data.episodes_seed is None else config.data.episodes_seed
        train_data = train_data.take_episodes(config.data.episodes, seed)
    return train_data, val_data


def check_run_dir(config: TrainConfig, defaults: TrainConfig | None = None) -> Path | None:
    """The newest complete checkpoint in config.out_dir that `config` may resume from, or None
    (`eva_rl.rundir.check_run_dir` with the checkpoint's config; `defaults`: as in `train`).

    Raises FileExistsError when out_dir holds checkpoints or a finished run but config.resume is
    off, and ValueError when the checkpoint was written by a different config. Call it before
    writing anything into out_dir (config.yaml), so that a refused run leaves the old run's files.
    """
    return rundir.check_run_dir(Path(config.out_dir), config_to_dict(config),
                                config_to_dict(defaults or TrainConfig()), config.resume)


# --- pretraining -------------------------------------------------------------------------------

def pretrain(config: TrainConfig) -> TrainResult:
    """Pretrain a DT on config.data: writes config.yaml, tb/, checkpoints/, model/, metrics.json in out_dir."""
    out_dir = Path(config.out_dir)
    check_run_dir(config)  # a refused run must not overwrite the config.yaml of the run in out_dir
    dataset = load_dataset(config)
    policy = build_policy(config, dataset)
    if is_main_process():
        save_config(config, out_dir / "config.yaml")
    return train(config, policy=policy, dataset=dataset, run_info=RunInfo(kind="pretrain"),
                 on_end=lambda trained: trained.save_pretrained(out_dir / "model"))
