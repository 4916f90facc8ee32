"""Process-group plumbing of the evaluation runner: torchrun's rank and world size, barriers, and a step that rank 0
runs while the other ranks wait (preparing the protocol before generation)."""
from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch

T = TypeVar("T")


def distributed_context() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(world_size: int) -> None:
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=6))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank_zero_first(rank: int, step: Callable[[], T], is_user_error: Callable[[BaseException], bool]) -> T | None:
    """`step()` on rank 0 while the other ranks wait; returns its value on rank 0, None elsewhere. An error there
    stops every rank, a user error (`is_user_error`, the scripts' exit-2 rule) as a ValueError with its message,
    instead of leaving the others at a barrier until its 6-hour timeout."""
    failure, value = None, None
    if rank == 0:
        try:
            value = step()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            failure = exc
    if torch.distributed.is_initialized():
        status = [None if failure is None else (f"{type(failure).__name__}: {failure}", is_user_error(failure))]
        torch.distributed.broadcast_object_list(status, src=0)
        if rank != 0 and status[0] is not None:
            message, user = status[0]
            raise (ValueError if user else RuntimeError)(f"rank 0 stopped before generation: {message}")
    if failure is not None:
        raise failure
    return value
