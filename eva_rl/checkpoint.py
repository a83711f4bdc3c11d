"""Training state save and resume: model, optimizer, schedule, RNGs of every rank, hook state, step.

A checkpoint is a directory `checkpoints/step_<n>/`:
    model.safetensors   the policy's weights (PEFT wrappers included)
    trainer.pt          optimizer, scheduler, every rank's RNG states and open log window, hook state
    meta.json           step, metrics history, resolved config, world size
The directory is written whole through `storage.atomic_dir`, so a `step_<n>` name means a complete
checkpoint (`eva_rl.rundir.find_checkpoint` finds the newest). `checkpoints/latest` names the
newest one for people and tools; the loader does not need it.

Resuming restores all of it, so a killed run continues to exactly the weights an uninterrupted
run reaches (on CPU). A damaged newest checkpoint is skipped for the next older good one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from eva_rl import storage
from eva_rl.distributed import Dist, barrier, gather
from eva_rl.rundir import CHECKPOINT_PREFIX, check_same_config, complete_checkpoints
from eva_rl.rundir import find_checkpoint  # noqa: F401 - where checkpoint readers have found it
from eva_rl.storage import atomic_dir, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the training loop carries from one update to the next; all of it is checkpointed."""

    policy: nn.Module  # the policy being trained (unwrapped: no DDP, no compile)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LR scheduler
    generator: np.random.Generator  # this rank's window sampler
    device: torch.device
    hook: Callable[[int], None] | None = None  # on_step; its state_dict/load_state_dict are checkpointed if present
    step: int = 0  # updates done
    history: dict[str, Any] = field(default_factory=lambda: {
        "train_loss": [], "val_action_error": [], "eval": [], "train_seconds": 0.0})
    loss_sum: torch.Tensor | None = None  # () this rank's summed loss over the open log window
    window_steps: int = 0  # updates in the open log window


def _step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"


def save_checkpoint(checkpoints: Path, step: int, model: nn.Module, trainer_state: dict, meta: dict,
                    keep: int) -> Path:
    """Write checkpoint `step` through `storage.atomic_dir` (a temp dir, fsynced, swapped in whole),
    then the `latest` pointer, then prune to the newest `keep` complete ones.

    A crash at any point leaves the previous checkpoints untouched and the new one either complete
    or absent (a re-save of a step swaps the old copy out in one step); a leftover temp dir is
    ignored by `find_checkpoint` and removed by the next save.
    """
    from safetensors.torch import save_model

    checkpoints.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(checkpoints)
    final = _step_dir(checkpoints, step)
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}))
    write_text_atomic(checkpoints / "latest", final.name + "\n")
    # Count only complete checkpoints: a stray step_* dir without its files must not push a good one out.
    for old in complete_checkpoints(checkpoints)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def recover_checkpoints(checkpoints: Path) -> None:
    """Settle what killed writers left in `checkpoints` (rank 0, before loading or saving): an
    interrupted re-save of a step gets its old copy back (storage.recover_dir), temp dirs of steps
    that may never be saved again go, and so do the `.tmp-*` dirs earlier versions wrote (one
    writer per run dir, so any found before a save is dead)."""
    for step_dir in storage.interrupted_writes(checkpoints):
        storage.recover_dir(step_dir)
    for leftover in checkpoints.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict, dict]:
    """Load weights into `model` (strict) and return (trainer_state, meta). Never unpickles arbitrary objects."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"), strict=True)
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return trainer_state, meta


def load_newest_good(checkpoints: Path, model: nn.Module) -> tuple[Path, dict, dict] | None:
    """Load the newest checkpoint that reads back whole: (its path, trainer_state, meta), or None.

    An unreadable one (disk trouble) is skipped with a warning, and the next older one, loaded
    strictly over it, replaces anything it set."""
    for path in complete_checkpoints(checkpoints):
        try:
            return (path, *load_checkpoint(path, model))
        except Exception as exc:  # a damaged file: any reader error; fall back to an older checkpoint
            log.warning("Checkpoint %s does not load (%s: %s); trying an older one.", path, type(exc).__name__, exc)
    return None


# --- a whole training state --------------------------------------------------------------------

def save_state(checkpoints: Path, state: TrainState, config: dict, keep: int, ddp: Dist) -> None:
    """Checkpoint `state` (every rank's RNGs and open log window; rank 0 writes), then all ranks wait."""
    per_rank = gather((_rng_state(state.generator, state.device), float(state.loss_sum)), ddp)
    if ddp.main:
        trainer_state = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                         "rng": [rng for rng, _ in per_rank],
                         "loss_window": {"sums": [loss for _, loss in per_rank], "steps": state.window_steps}}
        if hasattr(state.hook, "state_dict"):
            trainer_state["hook"] = state.hook.state_dict()
        meta = {"history": state.history, "config": config, "world_size": ddp.world_size}
        save_checkpoint(checkpoints, state.step, state.policy, trainer_state, meta, keep)
    barrier(ddp)


def resume_state(checkpoints: Path, state: TrainState, config: dict, ddp: Dist, defaults: dict | None = None) -> Path:
    """Load the newest good checkpoint into `state` (weights, optimizer, schedule, RNGs, hook, step,
    history, log window); its path. `config` must equal the one that wrote it, keys that config
    lacks counting as equal at their `defaults` (see `eva_rl.rundir.config_differences`)."""
    if ddp.main:
        recover_checkpoints(checkpoints)
    barrier(ddp)
    loaded = load_newest_good(checkpoints, state.policy)
    if loaded is None:
        raise ValueError(f"No checkpoint in {str(checkpoints)!r} loads (see the warnings above). "
                         f"Move the directory away to start afresh.")
    found, trainer_state, meta = loaded
    check_same_config(meta["config"], config, defaults)
    if meta["world_size"] != ddp.world_size:
        raise ValueError(f"Cannot resume {found}: it was written by {meta['world_size']} processes, "
                         f"now {ddp.world_size}. Resume with the same --nproc_per_node.")
    state.optimizer.load_state_dict(trainer_state["optimizer"])
    state.scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(trainer_state["rng"][ddp.rank], state.generator, state.device)
    if hasattr(state.hook, "load_state_dict") and "hook" in trainer_state:
        state.hook.load_state_dict(trainer_state["hook"])
    window = trainer_state.get("loss_window", {"sums": [0.0] * ddp.world_size, "steps": 0})
    state.step, state.history = int(meta["step"]), meta["history"]
    state.loss_sum = torch.full((), float(window["sums"][ddp.rank]), device=state.device)
    state.window_steps = int(window["steps"])
    return found


def _rng_state(generator: np.random.Generator, device: torch.device) -> dict:
    state = {"numpy": json.dumps(generator.bit_generator.state), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: np.random.Generator, device: torch.device) -> None:
    generator.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
