"""DINO self-distillation: teacher targets (centring + sharpening) and the centre as state.

Reference: M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021; used per frame by DoRA (S. Venkataramanan et al., "Is ImageNet worth 1 video?
Learning strong image encoders from 1 long unlabelled video", ICLR 2024).

For teacher logits ``t`` and student logits ``s`` over ``C`` prototypes::

    q = softmax((t - center) / tau_t)          # teacher target, no grad
    H(q, s) = -sum_c q_c * log_softmax(s / tau_s)_c

:func:`teacher_probs` and :func:`cross_entropy` are the two halves (pure functions; DoRA's loss,
:func:`wtours.objectives.dora.dora_loss`, averages ``H`` over its views). :class:`DINOLoss` owns the
state: the centre ``[1, C]`` (a buffer, so it is in the state dict and checkpoints), an EMA
(momentum 0.9) of the teacher logits' batch mean, averaged over ranks, as dinov2's ``DINOLoss`` does::

    dino = DINOLoss(out_dim=65536)
    q = dino.targets(teacher_logits, teacher_temp)      # [..., C]: what the student is trained towards
    dino.queue_center(teacher_logits)                   # every micro-batch (starts the all-reduce)
    ...                                                 # backward, optimizer step
    dino.apply_center_update()                          # once per optimizer step

With gradient accumulation the update uses the mean of the queued micro-batches' means, so the
centre moves once per optimizer step whatever the accumulation. The queue is empty between optimizer
steps (where checkpoints are written), so it is not state.

Departures from the reference code: softmaxes and reductions run in float32 with autocast off
(the network may run in bf16); the centre update is split in queue/apply (the reference updates inside
``forward``) and its all-reduce is asynchronous (dinov2); ``teacher_temp`` may be a tensor (no host
sync when scheduled on the GPU); the cross-entropy is computed as ``logsumexp(s/tau_s) - <q, s/tau_s>``
(valid since sum q = 1), which avoids materialising ``log_softmax``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wtours.objectives.distributed import all_reduce_sum_async, world_size


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor,
                  teacher_temp: float | torch.Tensor) -> torch.Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - center) / tau_t)`` in fp32, no grad."""
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        t = teacher_logits.detach().float()
        return torch.softmax((t - center.float()) / teacher_temp, dim=-1)


def cross_entropy(q: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``H(q, softmax(s / tau_s))`` over the last dim, fp32; ``q`` and ``s`` broadcast together.

    Returns the broadcast shape without the last dim.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float() / student_temp
        return torch.logsumexp(s, dim=-1) - (q.float() * s).sum(dim=-1)


class DINOLoss(nn.Module):
    """DINO's teacher side: targets (centred + sharpened, or Sinkhorn-Knopp) and the centre state.

    Args:
        out_dim: number of prototypes ``C``.
        center_momentum: EMA momentum of the centre (0.9).
        centering: ``"center"`` (DINO, DoRA) or ``"sinkhorn"`` (SwAV / DINOv2; see :meth:`targets`).
        sinkhorn_iters: Sinkhorn-Knopp rounds for ``centering="sinkhorn"``.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "center",
                 sinkhorn_iters: int = 3) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        self.out_dim = out_dim
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iters = sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._queued: list[tuple[torch.Tensor, Any]] = []  # (local batch mean [1, C], all-reduce handle)

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float | torch.Tensor,
                extra_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher targets ``q [..., C]`` (fp32, rows sum to 1) for logits ``[..., C]``.

        ``centering="center"`` (DINO, DoRA): ``softmax((t - center) / tau_t)``.
        ``centering="sinkhorn"`` (SwAV / DINOv2): Sinkhorn-Knopp over all rows of the batch with
        ``eps = tau_t`` and ``sinkhorn_iters`` rounds, so the batch uses every prototype equally
        (a batch whose rows are alike can then not get uniform targets); no centre is needed.
        ``extra_logits [R, C]`` (Sinkhorn only; SwAV's queue): more rows that join the problem (the
        equipartition then holds over them too) and are dropped from the result.
        """
        if self.centering == "center":
            return teacher_probs(teacher_logits, self.center, teacher_temp)
        from wtours.objectives.sinkhorn import sinkhorn_knopp

        flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).float()
        m = flat.shape[0]
        if extra_logits is not None and extra_logits.numel():
            flat = torch.cat([flat, extra_logits.detach().float().reshape(-1, flat.shape[-1])])
        q = sinkhorn_knopp(flat, eps=float(teacher_temp), iters=self.sinkhorn_iters)[:m]
        return q.reshape(teacher_logits.shape)

    @torch.no_grad()
    def queue_center(self, teacher_logits: torch.Tensor) -> None:
        """Queue the batch mean of ``teacher_logits [..., C]`` (all leading dims) for the next
        :meth:`apply_center_update`; its sum over ranks starts now (asynchronous, no host sync)."""
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            mean = teacher_logits.detach().float().reshape(-1, self.out_dim).mean(0, keepdim=True)
        self._queued.append((mean, all_reduce_sum_async(mean)))

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Once per optimizer step: ``center <- m * center + (1 - m) * mean`` of the queued batch means
        (over micro-batches and ranks); empties the queue. Nothing queued: nothing changes."""
        if not self._queued:
            return
        for _, handle in self._queued:
            if handle is not None:
                handle.wait()
        means = torch.cat([m for m, _ in self._queued])  # [n, C], each summed over ranks
        self._queued.clear()
        batch_center = means.mean(0, keepdim=True) / world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
