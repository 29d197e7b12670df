"""One process or many: rank, world size and device from the environment ``torchrun`` sets.

Run alone, a process is rank 0 of 1 and no process group exists. Under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set), the group uses NCCL when the device is CUDA and gloo on the CPU. Only rank 0 logs and
writes files (``is_main``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ctxmix.errors import CtxmixError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise CtxmixError(f"environment variable {name}={text!r}: expected an integer") from None


def resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CtxmixError("device=cuda was asked for, but torch sees no CUDA device")
    if local_rank >= torch.cuda.device_count():
        raise CtxmixError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Read the torchrun environment, pick the device and (if launched by torchrun) join the group."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise CtxmixError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistContext(rank, world_size, local_rank, device, launched)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group cleanly: wait for every rank, free what still holds the group (DDP's
    reducer sits in reference cycles), then destroy it. Without this, gloo's worker threads can outlive
    the interpreter and abort the process at exit ("terminate called without an active exception")."""
    if ctx.distributed and dist.is_initialized():
        import gc

        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op on one process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on at least one (keeps wall-clock stops in step)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
