"""DINO self-distillation loss with centring and sharpening.

Reference: M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021; used per frame by DoRA (S. Venkataramanan et al., "Is ImageNet worth 1 video?
Learning strong image encoders from 1 long unlabelled video", ICLR 2024).

For teacher logits ``t`` and student logits ``s`` over ``C`` prototypes::

    q = softmax((t - center) / tau_t)          # teacher target, no grad
    H(q, s) = -sum_c q_c * log_softmax(s / tau_s)_c

``DINOLoss.forward`` averages ``H`` over the ``M`` rows (images) and the ``S`` student views.
The centre is an EMA (momentum 0.9) of the teacher logits' batch mean, averaged over ranks; call
:meth:`DINOLoss.update_center` once per optimiser step, after the loss (as the reference does).

Shapes: ``student_logits [S, M, C]``, ``teacher_logits [M, C]``, ``center [1, C]``.

Example::

    crit = DINOLoss(out_dim=65536)
    loss = crit(student_logits, teacher_logits, teacher_temp=0.04)
    loss.backward(); crit.update_center(teacher_logits)

Departures from the reference code: softmaxes and reductions run in float32 with autocast off
(the network may run in bf16); the centre update lives in its own method (the reference calls it
inside ``forward``); ``teacher_temp`` may be a tensor (no host sync when scheduled on the GPU);
the cross-entropy is computed as ``logsumexp(s/tau_s) - <q, s/tau_s>`` (valid since sum q = 1),
which avoids materialising ``log_softmax``.
"""

from __future__ import annotations

import torch
from torch import nn

from wtours.objectives.distributed import all_reduce_mean_


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
    """Cross-entropy between centred/sharpened teacher and student distributions.

    Args:
        out_dim: number of prototypes ``C``.
        student_temp: ``tau_s`` (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iters: int = 3) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iters = sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float | torch.Tensor) -> torch.Tensor:
        """Teacher targets ``q [..., C]`` (fp32, rows sum to 1) for logits ``[..., C]``.

        ``centering="center"`` (DINO, DoRA): ``softmax((t - center) / tau_t)``.
        ``centering="sinkhorn"`` (SwAV / DINOv2): Sinkhorn-Knopp over all rows of the batch with
        ``eps = tau_t`` and ``sinkhorn_iters`` rounds, so the batch uses every prototype equally
        (a batch whose rows are alike can then not get uniform targets); no centre is needed.
        """
        if self.centering == "center":
            return teacher_probs(teacher_logits, self.center, teacher_temp)
        from wtours.objectives.sinkhorn import sinkhorn_knopp

        flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        q = sinkhorn_knopp(flat.float(), eps=float(teacher_temp), iters=self.sinkhorn_iters)
        return q.reshape(teacher_logits.shape)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                teacher_temp: float | torch.Tensor) -> torch.Tensor:
        """``student_logits [S, M, C]`` (or ``[M, C]``), ``teacher_logits [M, C]`` -> scalar."""
        if student_logits.dim() == 2:
            student_logits = student_logits.unsqueeze(0)
        if student_logits.shape[1:] != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} do not match "
                             f"teacher logits {tuple(teacher_logits.shape)} as [S, M, C] vs [M, C]")
        q = teacher_probs(teacher_logits, self.center, teacher_temp)
        return cross_entropy(q.unsqueeze(0), student_logits, self.student_temp).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the batch mean of ``teacher_logits [..., C]`` (all leading dims; all ranks)."""
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            batch_center = teacher_logits.detach().float().reshape(-1, self.out_dim).mean(0, keepdim=True)
            batch_center = all_reduce_mean_(batch_center)
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
