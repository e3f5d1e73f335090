"""Where a run executes: device choice, one process or a ``torchrun`` job, and the few collective
operations the trainer needs (sum across ranks, rank 0's object to every rank, the DDP wrap).

Everything that depends on the device or on distribution lives here, so the training loop,
evaluation and the benchmarks share one definition of each.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dance.errors import DanceError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextmanager
def cpu_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the block, the previous count restored after; None
    leaves it alone."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DanceError(f"train.device={name} but CUDA is not available on this machine")
    return torch.device(name)


def setup_runtime(device_name: str) -> Runtime:
    """Single process, or one process of a ``torchrun`` job (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _tuned(Runtime(pick_device(device_name)))
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _tuned(Runtime(device, rank, world, local))


def _tuned(rt: Runtime) -> Runtime:
    """On CUDA, let cuDNN pick the fastest algorithm per input shape (a DANCE run has a few
    fixed shapes, one per scale, each searched once: ``train.warmup_shapes``)."""
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return rt


def all_reduce_(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum ``t`` in place over every rank (a no-op in one process)."""
    if rt.distributed:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def broadcast_from_main(obj: Any, rt: Runtime) -> Any:
    """Rank 0's ``obj`` (JSON-like) on every rank; the other ranks' values are ignored."""
    if not rt.distributed:
        return obj
    import torch.distributed as dist
    box = [obj if rt.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` under DistributedDataParallel in a ``torchrun`` job, else ``model`` itself."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DataParallel/DDP or ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def autocast(device: torch.device, amp: bool):
    """Mixed precision for a forward pass: bf16 on CUDA (no overflow, no loss scaling), fp16 only
    on GPUs without bf16 (pre-Ampere); full precision on CPU or with ``amp`` off."""
    if not amp or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
