"""Where a run computes and how its processes talk: device, precision, process group, collectives.

Started under `torchrun`, every process joins one process group (gloo on CPU, NCCL on CUDA)
before any work that needs its peers (EVA's statistics, DDP's gradients). Outside torchrun
everything here degrades to a single process: collectives return their input.

NCCL reduces only CUDA tensors and gloo only CPU ones in this project's use, so a collective's
tensor lives on `collective_device()`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (one process: rank 0 of 1)."""

    rank: int = 0  # global rank
    world_size: int = 1  # processes in the job
    local_rank: int = 0  # rank on this machine (the CUDA device index under torchrun)
    created: bool = False  # init_distributed created the process group (and `shutdown` destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the process that writes configs and files,
    whether or not the process group exists yet."""
    return int(os.environ.get("RANK", "0")) == 0


def device_type(name: str) -> str:
    """"cuda" or "cpu": the kind of device the config's `device` name resolves to."""
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def init_distributed(device_type: str) -> Dist:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA), or run as one process.

    A group that already exists (created by the caller, e.g. finetune before EVA) is joined, not
    re-created, and left for its creator to destroy.
    """
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # NCCL binds each rank to the current device
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=True)


def shutdown(ddp: Dist) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if ddp.created and dist.is_initialized():
        dist.destroy_process_group()


def distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    if distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(obj: Any, ddp: Dist) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if ddp.world_size == 1:
        return [obj]
    out: list = [None] * ddp.world_size
    dist.all_gather_object(out, obj)
    return out


def all_mean(value: torch.Tensor, ddp: Dist) -> torch.Tensor:
    """The mean of `value` over ranks (a new tensor; `value` itself in a single process)."""
    if ddp.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / ddp.world_size


def barrier(ddp: Dist) -> None:
    if ddp.world_size > 1:
        dist.barrier()


# --- device and precision ----------------------------------------------------------------------

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for config.device (`auto` = CUDA when present); CUDA under torchrun = cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no CUDA device. Use device=cpu or device=auto.")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); else bf16 is emulated and slow.

    The package's one probe: training's `precision: auto` and bf16 inference both ask it. (oneDNN's
    own `_is_mkldnn_bf16_supported` also says yes on plain AVX-512, where bf16 is emulated.)
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
