"""EMA teacher update and per-step cosine schedules (DINO, Caron et al., ICCV 2021; DoRA,
Venkataramanan et al., ICLR 2024: teacher momentum cosine 0.996 -> 1, LR warm-up + cosine,
weight decay cosine 0.04 -> 0.4).

Example::

    momentum = cosine_schedule(0.996, 1.0, total_steps)      # [total_steps] float64
    ema_update_(teacher, student, momentum[step])             # teacher = m*teacher + (1-m)*student

Departure from the reference: fused ``torch._foreach_mul_``/``_foreach_add_`` over all parameters
instead of a Python loop of ``mul_``/``add_`` (same formula); a 0-dim tensor momentum on the
parameters' device is accepted without a host sync (schedule kept on the GPU).
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor,
                trained_only: bool = False) -> None:
    """``teacher_p <- momentum * teacher_p + (1 - momentum) * student_p`` for every parameter.

    Parameters are paired in ``parameters()`` order (teacher and student must have the same
    architecture; buffers are not touched). ``momentum`` may be a float or a 0-dim tensor.
    ``trained_only``: skip the pairs whose student parameter is frozen (``requires_grad=False``), which
    the EMA would only perturb by rounding (a partially fine-tuned backbone keeps its frozen weights bit
    for bit).
    """
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    if trained_only:
        keep = [p.requires_grad for p in student.parameters()]
        t_params = [t for t, k in zip(t_params, keep) if k]
        s_params = [s for s, k in zip(s_params, keep) if k]
    if not t_params:
        return
    t_data = [p.data for p in t_params]
    if isinstance(momentum, torch.Tensor) and momentum.device != t_data[0].device:
        momentum = float(momentum)  # e.g. a CPU schedule entry: reading it needs no GPU sync
    if isinstance(momentum, torch.Tensor):
        # On-device momentum (a schedule kept on the GPU). Only the ``.Tensor`` overloads of
        # _foreach_mul take a tensor without converting it to a Python scalar (a host sync);
        # _foreach_lerp_ has no such overload.
        m = momentum.detach().to(torch.float32)
        by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        for t, s in zip(t_data, s_params):
            ts, ss = by_dtype.setdefault(t.dtype, ([], []))
            ts.append(t)
            ss.append(s)
        for dt, (ts, ss) in by_dtype.items():
            scaled = torch._foreach_mul(ss, (1.0 - m).to(dt))
            torch._foreach_mul_(ts, m.to(dt))
            torch._foreach_add_(ts, scaled)
    else:
        m = float(momentum)
        torch._foreach_mul_(t_data, m)
        torch._foreach_add_(t_data, s_params, alpha=1.0 - m)


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> torch.Tensor:
    """Per-step schedule ``[total_steps]`` (float64): linear warm-up then half-cosine.

    Same values as the reference ``utils.cosine_scheduler``: ``linspace(start_warmup, base,
    warmup_steps)`` followed by ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for
    ``i = 0..n-1``, ``n = total_steps - warmup_steps`` (the final value is approached, and
    reached only in the limit).
    """
    if total_steps < 0 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    warm = torch.linspace(start_warmup, base, warmup_steps, dtype=torch.float64)
    n = total_steps - warmup_steps
    i = torch.arange(n, dtype=torch.float64)
    cos = final + 0.5 * (base - final) * (1.0 + torch.cos(math.pi * i / max(n, 1)))
    return torch.cat([warm, cos])
