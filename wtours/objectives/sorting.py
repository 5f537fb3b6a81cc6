"""Differentiable sorting for NeCo: relaxed sorting networks (bitonic, odd-even) and torchsort ranks.

References:
  * F. Petersen, C. Borgelt, H. Kuehne, O. Deussen, "Differentiable Sorting Networks for Scalable
    Sorting and Ranking Supervision", ICML 2021 (relaxed bitonic / odd-even networks, the soft
    permutation matrix), and "Monotonic Differentiable Sorting Networks", ICLR 2022 (the Cauchy
    relaxation used here); code: ``diffsort`` 0.2.0, which NeCo uses.
  * V. Pariza, M. Salehi, G. Burghouts, F. Locatello, Y. M. Asano, "Near, far: Patch-ordering
    enhances vision foundation models' scene understanding" (NeCo), ICLR 2025, arXiv 2408.11054:
    each query patch's similarities to 49 reference patches are soft-sorted (bitonic, steepness
    100) and the student's soft permutation matrix is matched to the teacher's by cross-entropy.
  * M. Blondel, O. Teboul, Q. Berthet, J. Djolonga, "Fast Differentiable Sorting and Ranking",
    ICML 2020 (``torchsort.soft_rank``, the fast alternative; not in NeCo).

Maths (``shared/reference/neco.md`` §1.5). A comparator on wires ``(a, b)`` (min to ``a``, max to
``b``) with inputs ``xa, xb`` computes ``alpha = atan(s * (xb - xa)) / pi + 1/2`` and outputs
``min = alpha*xa + (1-alpha)*xb``, ``max = (1-alpha)*xa + alpha*xb``; the permutation matrix's
columns ``a, b`` are mixed the same way. Layers hold disjoint comparators. After all layers,
``P[r, i, j]`` is the weight of input ``i`` at sorted position ``j`` (ascending), so
``sorted = x @ P`` (diffsort's convention) and ``P`` is doubly stochastic.

Shapes: ``x [R, n]`` rows (one per query patch, ``n`` = references, 49 in NeCo) ->
``P [R, n, n]``; :func:`soft_sort_cross_entropy` -> ``[R, n]`` cross-entropies of the rows of
``P`` (one per reference ``i``: its distribution over rank positions). Everything is fp32 with
autocast off; logs are taken of ``max(P, eps)``.

Three implementations of the same maths (``impl``):

* ``"lean"`` (default): a custom autograd function that keeps only the inputs (``[R, n]`` for
  student and teacher) between forward and backward; the backward recomputes the comparators'
  ``alpha`` and the permutation matrices from checkpoints every ``~sqrt(2L)`` layers and applies
  the adjoint layer by layer (gathers on the two wires of each comparator, ``O(n c)`` per layer).
  The cross-entropy is fused into it, so neither ``P`` nor ``log P`` is kept, and rows can be
  processed in chunks (``chunk_rows``) so the transient memory of forward and backward is bounded
  (~5 and ~10 ``n x n`` fp32 matrices per row of a chunk).
* ``"autograd"``: the same gather-based layers through plain autograd (keeps ~2 ``n x c``
  tensors per layer and row).
* ``"naive"``: diffsort's formulation, dense ``0/1`` split / combine matrices and batched matmuls
  through autograd, identity comparators on untouched wires (the memory baseline of
  ``wtours bench neco``; the reference keeps ~1 MB of activations per sorted row this way).

Departures from diffsort:
  * Bitonic networks for ``n`` not a power of two: diffsort discards the top ``2^k - n`` wires and
    turns comparators that touch them into identities; that network does not sort for some ``n``
    (e.g. 22, 38, 42-46, 54: checked with hard comparators). We pad with ``-inf`` wires instead
    and compile the network: a comparator between a pad and a real wire becomes a relabelling of
    wires (no arithmetic), so every ``n`` sorts exactly. For ``n = 49`` (and powers of two) the
    compiled network is comparator for comparator the same as diffsort's.
  * Rows are processed as ``Q = P^T`` (positions x inputs), so a comparator mixes two contiguous
    rows; the returned ``P`` is the transposed view.
  * ``torchsort`` is a deliberate alternative (``rank_matching_loss``): soft ranks
    (``regularization="l2"``) of student and teacher rows matched by squared error on ranks / n.
    It has no permutation matrix and is not NeCo's loss.

Example::

    P = soft_permutation(sims, "bitonic", steepness=100.0)            # [R, 49, 49]
    ce, ent = soft_sort_cross_entropy(sims_s, sims_t, "bitonic", 100.0, 100.0)
    loss = ce.mean()                                                   # NeCo, §1.4 step 6
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Literal

import torch

from wtours.errors import UserError

NetworkKind = Literal["bitonic", "odd_even"]
Impl = Literal["lean", "autograd", "naive"]
NETWORKS = ("bitonic", "odd_even")
SORTERS = ("bitonic", "odd_even", "torchsort")
LOG_EPS = 1e-12


# ----------------------------------------------------------------------------- networks


@dataclass(frozen=True)
class SortingNetwork:
    """A compiled comparator network on ``n`` wires.

    ``layers[l] = (a, b)``: tuples of wire indices, comparator ``k`` of layer ``l`` puts the
    minimum on ``a[k]`` and the maximum on ``b[k]``; the wires of one layer are disjoint.
    ``order[j]``: the wire that holds sorted position ``j`` at the end (identity unless a
    padded bitonic network relabelled wires).
    """

    kind: str
    n: int
    layers: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    order: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def comparators(self) -> int:
        return sum(len(a) for a, _ in self.layers)

    def hard_sort(self, values: list[float]) -> list[float]:
        """Run the network with exact comparators (tests; pure Python)."""
        x = list(values)
        for a, b in self.layers:
            for i, j in zip(a, b):
                x[i], x[j] = min(x[i], x[j]), max(x[i], x[j])
        return [x[w] for w in self.order]


def _bitonic_comparators(k: int) -> list[list[tuple[int, int]]]:
    """Textbook bitonic sorter on ``2^k`` wires: layers of (min wire, max wire)."""
    n = 1 << k
    layers = []
    for block in range(k):
        for stage in range(block + 1):
            m = 1 << (block - stage)
            layer = []
            for i in range(0, n, 2 * m):
                for j in range(m):
                    a, b = i + j, i + j + m
                    if ((i + j) >> (block + 1)) & 1:  # descending half of the bitonic merge
                        a, b = b, a
                    layer.append((a, b))
            layers.append(layer)
    return layers


@functools.lru_cache(maxsize=32)
def bitonic_network(n: int) -> SortingNetwork:
    """Bitonic network for any ``n >= 1`` (padded with ``-inf`` wires, compiled; see module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    k = max(1, math.ceil(math.log2(n)))
    pad = (1 << k) - n
    slot: list[int | None] = [None] * pad + list(range(n))  # network wire -> real wire (None: a -inf pad)
    layers = []
    for layer in _bitonic_comparators(k):
        a_idx, b_idx = [], []
        for a, b in layer:
            sa, sb = slot[a], slot[b]
            if sa is not None and sb is not None:
                a_idx.append(sa)
                b_idx.append(sb)
            elif sa is not None and sb is None:  # -inf goes to the min wire a, the real value to b
                slot[a], slot[b] = None, sa
            # pad on a (min side) and real on b: nothing moves; two pads: nothing
        if a_idx:
            layers.append((tuple(a_idx), tuple(b_idx)))
    order = tuple(s for s in slot if s is not None)
    return SortingNetwork("bitonic", n, tuple(layers), order)


@functools.lru_cache(maxsize=32)
def odd_even_network(n: int) -> SortingNetwork:
    """Odd-even transposition network: ``n`` layers, layer ``l`` compares ``(i, i+1)`` for ``i = l mod 2, +2, ...``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    layers = []
    for l in range(n):
        a = tuple(range(l % 2, n - 1, 2))
        if a:
            layers.append((a, tuple(i + 1 for i in a)))
    return SortingNetwork("odd_even", n, tuple(layers), tuple(range(n)))


def get_network(kind: str, n: int) -> SortingNetwork:
    if kind == "bitonic":
        return bitonic_network(n)
    if kind == "odd_even":
        return odd_even_network(n)
    raise ValueError(f"unknown sorting network {kind!r}; choose one of {', '.join(NETWORKS)}")


_INDEX_CACHE: dict[tuple, tuple] = {}


def _indices(net: SortingNetwork, device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """The network's index tensors on ``device`` (cached): per layer ``(a [c], b [c])`` int64, and the
    final wire order (None when it is the identity)."""
    key = (net.kind, net.n, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        layers = [(torch.tensor(a, dtype=torch.long, device=device), torch.tensor(b, dtype=torch.long, device=device))
                  for a, b in net.layers]
        order = None if net.order == tuple(range(net.n)) else torch.tensor(net.order, dtype=torch.long, device=device)
        hit = _INDEX_CACHE[key] = (layers, order)
    return hit


# ----------------------------------------------------------------------------- the relaxed comparator


def cauchy_alpha(xa: torch.Tensor, xb: torch.Tensor, steepness: float) -> torch.Tensor:
    """Probability-like weight that ``xa`` is the smaller value: ``atan(s (xb - xa)) / pi + 1/2``."""
    return torch.atan(steepness * (xb - xa)) * (1.0 / math.pi) + 0.5


def _mix_(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
          delta: torch.Tensor | None = None) -> torch.Tensor:
    """Mix rows (dim 1) ``a`` and ``b`` of ``t`` in place: ``a <- w t_a + (1-w) t_b``,
    ``b <- (1-w) t_a + w t_b`` (``w`` broadcasts against ``t[:, a]``) -> ``t_a - t_b`` before the mix.

    Two ``index_select``, one product, two in-place adds, two ``index_copy_`` (faster than advanced
    indexing + ``lerp``); ``delta`` reuses an already computed ``t_a - t_b``."""
    ta, tb = t.index_select(1, a), t.index_select(1, b)
    if delta is None:
        delta = ta - tb
    wd = delta * w
    t.index_copy_(1, a, tb.add_(wd))
    t.index_copy_(1, b, ta.sub_(wd))
    return delta


def _layer_(x: torch.Tensor, q: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, s: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer in place on values ``x [R, n]`` and ``Q = P^T [R, n, n]`` (rows = wires) -> (alpha, xb - xa)."""
    xa, xb = x.index_select(1, a), x.index_select(1, b)
    d = xb - xa
    al = cauchy_alpha(xa, xb, s)
    _mix_(x, a, b, al, delta=-d)
    if q is not None:
        _mix_(q, a, b, al.unsqueeze(-1))
    return al, d


def _eye(r: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float32, device=device).expand(r, n, n).clone()


@torch.no_grad()
def _forward_q(x: torch.Tensor, net: SortingNetwork, s: float) -> torch.Tensor:
    """``Q = P^T [R, n(position), n(input)]`` without autograd (fp32)."""
    layers, order = _indices(net, x.device)
    x = x.detach().float().clone()
    q = _eye(x.shape[0], net.n, x.device)
    for a, b in layers:
        _layer_(x, q, a, b, s)
    return q if order is None else q[:, order]


def _check_rows(x: torch.Tensor, net: SortingNetwork) -> None:
    if x.dim() != 2 or x.shape[1] != net.n:
        raise ValueError(f"expected rows [R, {net.n}], got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- implementations


def _perm_autograd(x: torch.Tensor, net: SortingNetwork, s: float) -> torch.Tensor:
    """Gather-based layers through plain autograd -> ``P [R, n, n]``."""
    layers, order = _indices(net, x.device)
    r, n = x.shape
    q = torch.eye(n, dtype=torch.float32, device=x.device).expand(r, n, n)
    for a, b in layers:
        xa, xb = x[:, a], x[:, b]
        al = cauchy_alpha(xa, xb, s)
        x = x.index_copy(1, a, torch.lerp(xb, xa, al)).index_copy(1, b, torch.lerp(xa, xb, al))
        qa, qb = q[:, a], q[:, b]
        w = al.unsqueeze(-1)
        q = q.index_copy(1, a, torch.lerp(qb, qa, w)).index_copy(1, b, torch.lerp(qa, qb, w))
    if order is not None:
        q = q[:, order]
    return q.transpose(1, 2)


_DENSE_CACHE: dict[tuple, list] = {}


def _dense_layers(net: SortingNetwork, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """diffsort-style dense matrices per layer: split_a, split_b ``[c, n]``, combine_min, combine_max
    ``[n, c]`` (wires a layer does not touch get an identity comparator with factors 1/2)."""
    key = (net.kind, net.n, str(device))
    if key not in _DENSE_CACHE:
        out = []
        for a, b in net.layers:
            untouched = sorted(set(range(net.n)) - set(a) - set(b))
            c = len(a) + len(untouched)
            sa, sb = torch.zeros(c, net.n), torch.zeros(c, net.n)
            cmin, cmax = torch.zeros(net.n, c), torch.zeros(net.n, c)
            for k, (i, j) in enumerate(zip(a, b)):
                sa[k, i] = sb[k, j] = 1.0
                cmin[i, k] = cmax[j, k] = 1.0
            for k, w in enumerate(untouched, start=len(a)):
                sa[k, w] = sb[k, w] = 1.0
                cmin[w, k] = cmax[w, k] = 0.5
            out.append(tuple(t.to(device) for t in (sa, sb, cmin, cmax)))
        _DENSE_CACHE[key] = out
    return _DENSE_CACHE[key]


def _perm_naive(x: torch.Tensor, net: SortingNetwork, s: float) -> torch.Tensor:
    """diffsort's dense formulation (split / combine matmuls) through autograd -> ``P [R, n, n]``."""
    _, order = _indices(net, x.device)
    r, n = x.shape
    p = torch.eye(n, dtype=torch.float32, device=x.device).expand(r, n, n)
    for sa, sb, cmin, cmax in _dense_layers(net, x.device):
        xa, xb = x @ sa.T, x @ sb.T
        al = cauchy_alpha(xa, xb, s)
        pa, pb = p @ sa.T, p @ sb.T  # [R, n, c]
        w = al.unsqueeze(-2)
        w_min = w * pa + (1 - w) * pb
        w_max = (1 - w) * pa + w * pb
        p = w_max @ cmax.T + w_min @ cmin.T
        x = (al * xa + (1 - al) * xb) @ cmin.T + ((1 - al) * xa + al * xb) @ cmax.T
    return p if order is None else p[:, :, order]


def _segments(depth: int) -> list[tuple[int, int]]:
    """Checkpoint segments ``[(start, end), ...]`` of ~sqrt(2 * depth) layers each."""
    k = max(1, math.ceil(math.sqrt(2 * depth)))
    return [(s, min(s + k, depth)) for s in range(0, depth, k)]


class _LeanSortCE(torch.autograd.Function):
    """Fused soft sort + row cross-entropy with recomputation (``impl="lean"``, see the module docstring).

    Rows are processed in chunks of ``chunk`` rows (0: all at once), in forward and in backward, so the
    transient memory of the sorter is bounded whatever the batch."""

    @staticmethod
    def forward(ctx, xs, xt, net, ss, st, eps, chunk):  # type: ignore[override]
        r = xs.shape[0]
        step = chunk if chunk > 0 else max(r, 1)
        ce, ent = torch.empty(r, net.n, device=xs.device), torch.empty(r, net.n, device=xs.device)
        with torch.no_grad():
            for s in range(0, r, step):
                qs = _forward_q(xs[s:s + step], net, ss)
                qt = _forward_q(xt[s:s + step], net, st)
                ce[s:s + step] = -(qt * qs.clamp_min_(eps).log_()).sum(dim=1)  # row i of P = column i of Q
                ent[s:s + step] = -(qt * qt.clamp_min(eps).log()).sum(dim=1)
                del qs, qt
        ctx.save_for_backward(xs.detach(), xt.detach())
        ctx.net, ctx.ss, ctx.st, ctx.eps, ctx.chunk = net, ss, st, eps, step
        ctx.mark_non_differentiable(ent)
        return ce, ent

    @staticmethod
    def backward(ctx, g_ce, g_ent):  # type: ignore[override]
        xs, xt = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        gx = torch.empty_like(xs, dtype=torch.float32)
        step = ctx.chunk
        for s in range(0, xs.shape[0], step):
            gx[s:s + step] = _lean_backward(xs[s:s + step], xt[s:s + step], g_ce[s:s + step], ctx.net, ctx.ss,
                                            ctx.st, ctx.eps)
        return gx.to(xs.dtype), None, None, None, None, None, None


@torch.no_grad()
def _lean_backward(xs: torch.Tensor, xt: torch.Tensor, g_ce: torch.Tensor, net: SortingNetwork, s: float,
                   st: float, eps: float) -> torch.Tensor:
    """Gradient of ``sum(g_ce * ce)`` w.r.t. the student rows ``xs [R, n]`` (recomputing everything)."""
    layers, order = _indices(net, xs.device)
    r, n = xs.shape
    # 1. values path: alpha and (xb - xa) of every layer (R x c per layer, cheap)
    x = xs.float().clone()
    alphas, diffs = [], []
    for a, b in layers:
        al, d = _layer_(x, None, a, b, s)
        alphas.append(al)
        diffs.append(d)
    # 2. Q at segment starts (Q_0 = I is not stored), and the final Q
    segs = _segments(len(layers))
    ckpt: dict[int, torch.Tensor] = {}
    q = _eye(r, n, xs.device)
    for start, end in segs:
        if start > 0:
            ckpt[start] = q.clone()
        for l in range(start, end):
            _mix_(q, *layers[l], alphas[l].unsqueeze(-1))
    # 3. adjoint of the final Q: d/dQs of -sum_j Qt log max(Qs, eps), column i weighted by g_ce[r, i]
    qt = _forward_q(xt, net, st)
    if order is not None:
        q = q[:, order]
    g = torch.where(q > eps, -qt / q.clamp_min(eps), torch.zeros((), device=q.device)) * g_ce.float().unsqueeze(1)
    del qt, q
    if order is not None:
        g = g[:, torch.argsort(order)]
    # 4. reverse sweep, segment by segment (recompute the segment's inputs from its checkpoint)
    gx = torch.zeros_like(x)
    for start, end in reversed(segs):
        q = ckpt.pop(start) if start > 0 else _eye(r, n, xs.device)
        deltas = []
        for l in range(start, end):  # deltas[l] = Q_{l-1}[a] - Q_{l-1}[b]  [R, c, n]
            if l + 1 < end:
                deltas.append(_mix_(q, *layers[l], alphas[l].unsqueeze(-1)))
            else:
                a, b = layers[l]
                deltas.append(q.index_select(1, a) - q.index_select(1, b))
        del q
        for l in reversed(range(start, end)):
            a, b = layers[l]
            al, d = alphas[l], diffs[l]
            g_diff = g.index_select(1, a) - g.index_select(1, b)
            d_alpha = (g_diff * deltas.pop()).sum(dim=-1)  # permutation path
            _mix_(g, a, b, al.unsqueeze(-1), delta=g_diff)  # the 2x2 mix is symmetric: its adjoint is itself
            gx_diff = gx.index_select(1, a) - gx.index_select(1, b)
            d_alpha = d_alpha - gx_diff * d  # values path: d(min)/d(alpha) = xa - xb = -d
            _mix_(gx, a, b, al, delta=gx_diff)
            dd = d_alpha * (s / math.pi) / (1.0 + (s * d) ** 2)  # d alpha / d(xb - xa)
            gx.index_add_(1, a, -dd)
            gx.index_add_(1, b, dd)
    return gx


# ----------------------------------------------------------------------------- public API


def soft_permutation(x: torch.Tensor, network: str = "bitonic", steepness: float = 100.0,
                     impl: Impl = "autograd") -> torch.Tensor:
    """Soft permutation matrices ``P [R, n, n]`` of rows ``x [R, n]`` (fp32; ``sorted = x @ P``).

    ``impl``: ``"autograd"`` (gather layers) or ``"naive"`` (diffsort's dense matmuls); the lean
    implementation is fused with the loss (:func:`soft_sort_cross_entropy`).
    """
    net = get_network(network, x.shape[-1])
    _check_rows(x, net)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        if impl == "naive":
            return _perm_naive(x, net, float(steepness))
        if impl in ("autograd", "lean"):
            return _perm_autograd(x, net, float(steepness))
    raise ValueError(f"unknown impl {impl!r}")


def soft_sort_cross_entropy(x_student: torch.Tensor, x_teacher: torch.Tensor, network: str = "bitonic",
                            steepness_student: float = 100.0, steepness_teacher: float = 100.0,
                            eps: float = LOG_EPS, impl: Impl = "lean", chunk_rows: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """NeCo's per-row loss: ``ce[r, i] = -sum_j Pt[r, i, j] log max(Ps[r, i, j], eps)``.

    ``x_student, x_teacher [R, n]`` (teacher detached) -> ``(ce [R, n], teacher_entropy [R, n])``,
    both fp32; ``teacher_entropy`` (= ``ce`` when the student equals the teacher, its minimum) carries
    no gradient. Gradients flow to ``x_student`` only. ``chunk_rows`` (lean only): rows sorted at a time
    (bounds the transient memory; 0 = all at once).
    """
    net = get_network(network, x_student.shape[-1])
    _check_rows(x_student, net)
    _check_rows(x_teacher, net)
    if x_student.shape != x_teacher.shape:
        raise ValueError(f"student rows {tuple(x_student.shape)} != teacher rows {tuple(x_teacher.shape)}")
    with torch.autocast(device_type=x_student.device.type, enabled=False):
        xs, xt = x_student.float(), x_teacher.detach().float()
        if impl == "lean":
            return _LeanSortCE.apply(xs, xt, net, float(steepness_student), float(steepness_teacher), float(eps),
                                     int(chunk_rows))
        ps = soft_permutation(xs, network, steepness_student, impl)
        with torch.no_grad():
            pt = soft_permutation(xt, network, steepness_teacher, impl)
            ent = -(pt * pt.clamp_min(eps).log()).sum(dim=-1)
        ce = -(pt * ps.clamp_min(eps).log()).sum(dim=-1)
        return ce, ent


# ----------------------------------------------------------------------------- torchsort


def torchsort_problem(device: torch.device | str = "cpu") -> str | None:
    """Why the ``torchsort`` sorter cannot run on ``device`` (None when it can)."""
    try:
        import torchsort  # noqa: F401
        import torchsort.isotonic_cpu  # noqa: F401 - the compiled CPU op
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken compiled extension
        return (f"the torchsort sorter needs the torchsort package with its compiled extension, which cannot be "
                f"imported here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); install it "
                "with 'pip install --no-build-isolation torchsort' or choose loss.sorter=bitonic")
    if torch.device(device).type == "cuda" and not importlib.util.find_spec("torchsort.isotonic_cuda"):
        return ("torchsort was built without its CUDA extension (no nvcc at build time); rebuild it with "
                "'pip install --no-build-isolation --force-reinstall torchsort' where nvcc is on PATH, or choose "
                "loss.sorter=bitonic")
    return None


def rank_matching_loss(x_student: torch.Tensor, x_teacher: torch.Tensor, strength: float = 0.01
                       ) -> torch.Tensor:
    """torchsort alternative: ``((rank_s - rank_t) / n)^2`` per row ``[R]`` with soft ranks
    (``regularization="l2"``, ``regularization_strength=strength``) of ``[R, n]`` rows; teacher ranks
    carry no gradient. Raises :class:`UserError` (one line) when torchsort cannot run."""
    problem = torchsort_problem(x_student.device)
    if problem:
        raise UserError(f"loss.sorter: {problem}")
    import torchsort

    n = x_student.shape[-1]
    with torch.autocast(device_type=x_student.device.type, enabled=False):
        rs = torchsort.soft_rank(x_student.float(), regularization="l2", regularization_strength=strength)
        with torch.no_grad():
            rt = torchsort.soft_rank(x_teacher.detach().float(), regularization="l2", regularization_strength=strength)
        return ((rs - rt) / n).pow(2).mean(dim=-1)
