"""Tiny ``torch.distributed`` helpers that are no-ops in a single process.

Used by the objectives for cross-rank statistics (DINO's centre, per-batch means). They never
synchronise with the host: the collectives are issued on the tensors' own device and stream.

    from wtours.objectives.distributed import all_reduce_mean_
    batch_center = all_reduce_mean_(teacher_logits.float().mean(0, keepdim=True))
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


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``t`` (unchanged in a single process)."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; returns ``t`` (unchanged in a single process)."""
    if is_distributed():
        n = dist.get_world_size()
        if n > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(n)
    return t
