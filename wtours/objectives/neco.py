"""NeCo: patch neighbour consistency between a student and an EMA teacher (no Lightning here).

Reference: V. Pariza, M. Salehi, G. Burghouts, F. Locatello, Y. M. Asano, "Near, far: Patch-ordering
enhances vision foundation models' scene understanding" (NeCo), ICLR 2025, arXiv 2408.11054; code
``vpariza/NeCo`` ``src/neco.py``. Exact semantics: ``shared/reference/neco.md`` §1 (step numbers below).

Notation: ``B`` images, ``G`` global crops (2), ``L`` local crops (4), ``V = G + L``; pairs
``(g, v)`` for every teacher global crop ``g`` and student crop ``v != g`` (``P = G (V - 1) = 10``);
``C`` projected dims (256); ``n = roi^2`` aligned patches per pair and image (49).

Per step (all pairs batched; no Python loop over pairs, crops or rows)::

    T = roi_align(teacher_maps[g], box of (g ∩ v) in g)      # [B, P, n, C]   §1.4 step 1
    S = roi_align(student_maps[v], box of (g ∩ v) in v)      # [B, P, n, C]   step 2
    R = references(T or the queue of crop g)                 # [B, P, n, C]   step 3, no grad
    A_s = S R^T, A_t = T R^T                                 # [B, P, n, n]   cosine similarities
    loss = mean over (b, p, q, r) of -sum_k Pt[r, k] log Ps[r, k]   # steps 5-7 (wtours.objectives.sorting)

with ``Ps = softsort(A_s[b, p, q])`` (``n x n`` soft permutation of query ``q``'s similarities to the
``n`` references) and ``Pt`` the teacher's. With ``loss.sorter = torchsort`` the last line becomes
the rank-matching loss of :func:`wtours.objectives.sorting.rank_matching_loss` (not NeCo's).

Boxes: crop ``c`` is ``(x0, y0, x1, y1)`` in image pixels, its output side ``s_c``; the overlap
``I = C_g ∩ C_v`` maps into crop ``c``'s feature grid as ``(x - x0_c) / w_c * s_c / patch``; both
``roi_align`` calls use ``aligned=True``, output ``roi x roi``, adaptive sampling, so cell ``(i, j)``
of ``T`` and of ``S`` cover the same image region.

References (``loss.references``): ``"queue"`` (the DINOv2 configs): one FIFO queue of teacher patch
vectors per global crop index (``queue_length`` 8192); before the loss, ``queue_push_per_image x B``
random patches of the teacher's whole crop ``g`` are pushed, then every pair draws its ``B n``
references from the filled part of queue ``g``. ``"batch"`` (the DINO-family configs): every pair's
``B n`` teacher patches are shuffled across the batch.

Departures from the reference code (flags where behaviour must be reproducible):
  * one fill counter **per queue** (the reference shares one counter between the two queues and
    increments it twice per step, so early steps sample all-zero references); each image's set of
    ``n`` references is drawn **without replacement** from the filled entries only (the reference
    draws with replacement: ~13 % of its 49-reference sets hold a duplicate), and the first push
    holds at least ``n`` vectors. Under DDP every rank pushes the patches of all
    ranks (one ``all_gather``), so the queues are identical on every rank (the reference ran on 1 GPU).
  * pairs whose crops do not intersect (only possible after the crop fallback) get weight 0 and the
    mean is over the remaining pairs (the reference asserts non-empty overlaps).
  * the loss is fused with the sorter and recomputed in backward (``loss.impl = lean``), fp32 with
    autocast off and ``log(max(P, eps))`` (the reference takes ``log P`` unclamped).
  * the teacher is run under ``no_grad`` by the caller; its head starts as the reference's (its own
    random init) or, with ``model.teacher_head: copy``, as a copy of the student's
    (``wtours.stages.neco.module``).

Example::

    neco = NeCoLoss(dim=256)
    loss, stats = neco(t_maps, s_global_maps, s_local_maps, boxes, global_size=224, local_size=96, patch=16)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from wtours.objectives.boxes import box_area, box_intersection
from wtours.objectives.distributed import world_size
from wtours.objectives.sorting import LOG_EPS, rank_matching_loss, soft_sort_cross_entropy


def crop_pairs(g: int, v: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (teacher global crop ``g_p``, student crop ``v_p != g_p``) -> two ``[P]`` int64 tensors,
    ordered by ``g`` then ``v``."""
    gs = [gi for gi in range(g) for vi in range(v) if vi != gi]
    vs = [vi for gi in range(g) for vi in range(v) if vi != gi]
    return torch.tensor(gs, device=device), torch.tensor(vs, device=device)


def pair_boxes(boxes: torch.Tensor, sizes: torch.Tensor, pair_g: torch.Tensor, pair_v: torch.Tensor,
               patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlap of each pair in both crops' feature grids.

    ``boxes [B, V, 4]`` (image pixels), ``sizes [V]`` output side of each crop (pixels) ->
    ``(in_g [B, P, 4], in_v [B, P, 4], area [B, P])``: ``I = C_g ∩ C_v`` in crop ``g``'s and crop ``v``'s
    grid coordinates (pixels / patch), and ``I``'s area in image pixels (0 when empty).
    """
    cg, cv = boxes[:, pair_g], boxes[:, pair_v]  # [B, P, 4]
    inter = box_intersection(cg, cv)
    area = box_area(inter)

    def to_grid(crop: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        x0, y0, x1, y1 = crop.unbind(-1)
        sx = (side / patch) / (x1 - x0).clamp_min(1e-6)
        sy = (side / patch) / (y1 - y0).clamp_min(1e-6)
        ix0, iy0, ix1, iy1 = inter.unbind(-1)
        return torch.stack([(ix0 - x0) * sx, (iy0 - y0) * sy, (ix1 - x0) * sx, (iy1 - y0) * sy], dim=-1)

    side = sizes.to(boxes.dtype)
    return to_grid(cg, side[pair_g]), to_grid(cv, side[pair_v]), area


def _roi(maps: torch.Tensor, index: torch.Tensor, boxes: torch.Tensor, out: int) -> torch.Tensor:
    """``roi_align`` of ``boxes [M, 4]`` (grid units) from ``maps [N, C, h, w]`` (map ``index [M]``) -> ``[M, out*out, C]``."""
    rois = torch.cat([index.to(maps.dtype)[:, None], boxes.to(maps.dtype)], dim=1)
    r = roi_align(maps, rois, output_size=(out, out), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return r.flatten(2).transpose(1, 2)


def align_pairs(t_maps: torch.Tensor, s_global: torch.Tensor, s_local: torch.Tensor, boxes: torch.Tensor,
                global_size: int, local_size: int, patch: int, roi: int = 7
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROI-aligned patch vectors of every (teacher global, student crop) pair.

    ``t_maps [B, G, C, hg, wg]`` (teacher, global crops), ``s_global [B, G, C, hg, wg]``,
    ``s_local [B, L, C, hl, wl]``, ``boxes [B, G + L, 4]`` (image pixels) ->
    ``(T [B, P, n, C], S [B, P, n, C], area [B, P])``, L2-normalised along ``C``; ``n = roi^2``.
    Three ``roi_align`` calls (teacher; student globals; student locals), fp32.
    """
    b, g = t_maps.shape[:2]
    ln = s_local.shape[1]
    v = g + ln
    dev = t_maps.device
    pg_cpu, pv_cpu = crop_pairs(g, v)  # the pair layout is fixed: host-side indices, no device sync
    pg, pv = pg_cpu.to(dev), pv_cpu.to(dev)
    sizes = torch.tensor([global_size] * g + [local_size] * ln, device=dev)
    in_g, in_v, area = pair_boxes(boxes.to(dev), sizes, pg, pv, patch)
    npair = pg.shape[0]
    img = torch.arange(b, device=dev)[:, None].expand(b, npair)
    t = _roi(t_maps.flatten(0, 1).float(), (img * g + pg).reshape(-1), in_g.reshape(-1, 4), roi)
    s_parts, order = [], []
    for maps, is_crop, first, count in ((s_global, pv_cpu < g, 0, g), (s_local, pv_cpu >= g, g, ln)):
        if count == 0 or not bool(is_crop.any()):
            continue
        sel_cpu = torch.nonzero(is_crop).squeeze(1)
        sel = sel_cpu.to(dev)
        s_parts.append(_roi(maps.flatten(0, 1).float(), (img[:, sel] * count + pv[sel] - first).reshape(-1),
                            in_v[:, sel].reshape(-1, 4), roi).unflatten(0, (b, -1)))
        order.append(sel_cpu)
    s = torch.cat(s_parts, dim=1)  # [B, P, n, C] in the order of `order`
    s = s[:, torch.argsort(torch.cat(order)).to(dev)]
    t = t.unflatten(0, (b, npair))
    return F.normalize(t, dim=-1), F.normalize(s, dim=-1), area


def sample_distinct(gen: torch.Generator, pool: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` distinct indices per row, uniform over the ``n``-subsets of ``range(pool[r])``: ``pool [R]`` int64
    (each >= n) -> ``[R, n]`` int64. Floyd's algorithm vectorised over the rows (``n`` steps, one ``[R, n]``
    draw from ``gen``): step ``i`` draws ``t`` in ``[0, j]`` with ``j = pool - n + i`` and takes ``j`` instead
    when ``t`` was taken already."""
    rows = pool.shape[0]
    u = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    out = torch.empty(rows, n, dtype=torch.int64)
    for i in range(n):
        j = pool - n + i
        pick = (u[:, i] * (j + 1).double()).long().minimum(j)
        if i:
            pick = torch.where((out[:, :i] == pick[:, None]).any(dim=1), j, pick)
        out[:, i] = pick
    return out


class NeCoLoss(nn.Module):
    """NeCo's loss and its state (reference queues, sampler generator); see the module docstring.

    Args:
        dim: projected feature width ``C``.
        sorter: ``bitonic`` | ``odd_even`` (soft permutation cross-entropy) | ``torchsort`` (rank matching).
        impl: sorter implementation (``lean`` | ``autograd`` | ``naive``; :mod:`wtours.objectives.sorting`).
        steepness_student, steepness_teacher: Cauchy steepness of the two sorters (100, 100).
        roi: ROI-align output side (``n = roi^2`` references per image).
        references: ``queue`` | ``batch``.
        queue_length, queue_push_per_image: queue size per global crop, patches pushed per image and step.
        num_globals: global crops (one queue each).
        torchsort_strength: ``regularization_strength`` of ``torchsort.soft_rank``.
        eps: clamp inside the log.
        chunk_rows: ``impl="lean"``: rows sorted at a time (0 = all).
        seed: seeds the CPU generator of the reference sampling (the training step reseeds it every step).
    """

    def __init__(self, dim: int = 256, sorter: str = "bitonic", impl: str = "lean", steepness_student: float = 100.0,
                 steepness_teacher: float = 100.0, roi: int = 7, references: str = "queue", queue_length: int = 8192,
                 queue_push_per_image: int = 10, num_globals: int = 2, torchsort_strength: float = 0.01,
                 eps: float = LOG_EPS, seed: int = 0, chunk_rows: int = 0) -> None:
        super().__init__()
        self.dim, self.sorter, self.impl = dim, sorter, impl
        self.steepness_student, self.steepness_teacher = float(steepness_student), float(steepness_teacher)
        self.roi, self.references = roi, references
        self.queue_length, self.queue_push_per_image = queue_length, queue_push_per_image
        self.torchsort_strength, self.eps = torchsort_strength, eps
        self.num_globals = num_globals
        self.chunk_rows = chunk_rows
        if references == "queue":
            self.register_buffer("queue", torch.zeros(num_globals, queue_length, dim))
        self.ptr = [0] * num_globals  # host-side counters (no device sync to read them): counters() / load_counters()
        self.filled = [0] * num_globals
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    # --------------------------------------------------------------- state

    def counters(self) -> dict[str, Any]:
        """Host-side queue counters (the queue itself is a buffer, in the state dict); a checkpoint keeps them."""
        return {"ptr": list(self.ptr), "filled": list(self.filled)}

    def load_counters(self, state: dict[str, Any]) -> None:
        self.ptr = [int(x) for x in state["ptr"]]
        self.filled = [int(x) for x in state["filled"]]

    # --------------------------------------------------------------- references

    @torch.no_grad()
    def push(self, t_maps: torch.Tensor) -> None:
        """Queue ``queue_push_per_image x B`` random teacher patch vectors of each global crop.

        ``t_maps [B, G, C, h, w]`` (L2-normalised). One gather + one ``index_copy_`` per step.
        """
        b, g, c = t_maps.shape[:3]
        patches = t_maps.flatten(3).transpose(2, 3).transpose(0, 1).reshape(g, -1, c).float()  # [G, B*h*w, C]
        # at least one set of n = roi^2 references after the first push (a set holds no duplicate)
        k = min(max(self.queue_push_per_image * b, self.roi ** 2), self.queue_length, patches.shape[1])
        pick = torch.argsort(torch.rand(g, patches.shape[1], generator=self.generator), dim=1)[:, :k]
        new = torch.gather(patches, 1, pick.to(patches.device)[..., None].expand(g, k, c))  # [G, k, C]
        if world_size() > 1:  # every rank pushes every rank's patches: the queues stay identical across ranks
            parts = [torch.empty_like(new) for _ in range(world_size())]
            dist.all_gather(parts, new.contiguous())
            new = torch.cat(parts, dim=1)[:, -self.queue_length:]
            k = new.shape[1]
        slots = torch.stack([(torch.arange(k) + self.ptr[i]) % self.queue_length for i in range(g)])
        flat = (slots + torch.arange(g)[:, None] * self.queue_length).reshape(-1).to(self.queue.device)
        self.queue.view(-1, c).index_copy_(0, flat, new.reshape(-1, c).to(self.queue.dtype))
        for i in range(g):  # G host-side counters
            self.ptr[i] = (self.ptr[i] + k) % self.queue_length
            self.filled[i] = min(self.filled[i] + k, self.queue_length)

    @torch.no_grad()
    def draw_references(self, t: torch.Tensor, pair_g: torch.Tensor) -> torch.Tensor:
        """References ``[B, P, n, C]`` for aligned teacher vectors ``t [B, P, n, C]`` (see the module docstring)."""
        b, p, n, c = t.shape
        if self.references == "batch":
            pool = t.transpose(0, 1).reshape(p, b * n, c)
            perm = torch.argsort(torch.rand(p, b * n, generator=self.generator), dim=1).to(t.device)
            refs = torch.gather(pool, 1, perm[..., None].expand(p, b * n, c))
            return refs.view(p, b, n, c).transpose(0, 1)
        filled = [self.filled[int(gi)] for gi in pair_g.tolist()]
        if min(filled) < n:
            raise ValueError(f"a reference queue holds {min(filled)} vectors, fewer than the {n} references of a set")
        pool = torch.tensor(filled, dtype=torch.int64).repeat_interleave(b)  # [P*B]: one set per (pair, image)
        slot = sample_distinct(self.generator, pool, n).view(p, b * n)  # uniform over each queue's filled part
        flat = (slot + pair_g.cpu()[:, None] * self.queue_length).reshape(-1).to(t.device)
        refs = self.queue.view(-1, c).index_select(0, flat).view(p, b, n, c)
        return F.normalize(refs.transpose(0, 1).float(), dim=-1)

    # --------------------------------------------------------------- the loss

    def forward(self, t_maps: torch.Tensor, s_global: torch.Tensor, s_local: torch.Tensor, boxes: torch.Tensor,
                global_size: int, local_size: int, patch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """NeCo loss of one micro-batch -> (scalar loss, stats).

        ``t_maps [B, G, C, hg, wg]`` teacher projected maps (no grad), ``s_global [B, G, C, hg, wg]`` and
        ``s_local [B, L, C, hl, wl]`` student maps, ``boxes [B, G + L, 4]`` crop boxes (image pixels).
        Stats: ``teacher_entropy`` and ``kl`` (= loss - teacher entropy) for the permutation sorters,
        ``pairs_valid`` (fraction of pairs with a non-empty overlap).
        """
        with torch.autocast(device_type=t_maps.device.type, enabled=False):
            t_maps = t_maps.detach().float()
            g = t_maps.shape[1]
            t, s, area = align_pairs(t_maps, s_global, s_local, boxes, global_size, local_size, patch, self.roi)
            b, p, n, c = s.shape
            pair_g, _ = crop_pairs(g, g + s_local.shape[1])
            if self.references == "queue":
                self.push(F.normalize(t_maps, dim=2))
            refs = self.draw_references(t.detach(), pair_g)
            a_s = torch.einsum("bpqc,bprc->bpqr", s, refs)  # [B, P, n, n]
            with torch.no_grad():
                a_t = torch.einsum("bpqc,bprc->bpqr", t, refs)
            w = (area > 0).float()  # [B, P]
            denom = w.sum().clamp_min(1.0)
            stats: dict[str, torch.Tensor] = {"pairs_valid": w.mean()}
            if self.sorter == "torchsort":
                per_row = rank_matching_loss(a_s.reshape(-1, n), a_t.reshape(-1, n), self.torchsort_strength)
                loss = (per_row.view(b, p, n).mean(-1) * w).sum() / denom
                stats["rank_mse"] = loss.detach()
                return loss, stats
            ce, ent = soft_sort_cross_entropy(a_s.reshape(-1, n), a_t.reshape(-1, n), self.sorter,
                                              self.steepness_student, self.steepness_teacher, self.eps, self.impl,
                                              self.chunk_rows)
            loss = (ce.view(b, p, n * n).mean(-1) * w).sum() / denom
            entropy = (ent.view(b, p, n * n).mean(-1) * w).sum() / denom
            stats["teacher_entropy"] = entropy
            stats["kl"] = loss.detach() - entropy
            return loss, stats
