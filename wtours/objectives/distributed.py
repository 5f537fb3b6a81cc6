"""Tiny ``torch.distributed`` helpers that are no-ops in a single process.

Used by the objectives for cross-rank statistics (DINO's centre). They never synchronise with the
host: the collectives are issued on the tensors' own device and stream.

    from wtours.objectives.distributed import all_reduce_sum_async, world_size
    handle = all_reduce_sum_async(local_mean)      # starts now ...
    ...
    if handle is not None:
        handle.wait()                              # ... needed later
    mean = local_mean / world_size()
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_async(t: torch.Tensor) -> dist.Work | None:
    """Start an in-place sum of ``t`` over ranks; returns the handle to ``wait()`` on (None in a single
    process, where ``t`` is already the sum). NCCL's ``wait()`` orders the current stream, it does not
    block the host."""
    if is_distributed() and dist.get_world_size() > 1:
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
    return None
