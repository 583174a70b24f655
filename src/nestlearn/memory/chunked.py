"""Chunk-wise parallel Titans memory (Titans §3.2, Eq. 16-18), the fast path.

Inside a chunk of n <= C tokens every gradient is taken at the chunk-start state M_0 (mini-batch
gradient descent, Eq. 16, ``t' = t - mod(t, b)``): g_i = ∇ℓ(M_0; k_i, v_i). Unrolling
S_t = η_t S_{t-1} - θ_t g_t and M_t = (1 - α_t) M_{t-1} + S_t (Eq. 13) from (M_0, S_0), with
E_t = Π_{j<=t} η_j and A_t = Π_{j<=t} (1 - α_j):

    S_t = E_t S_0 - Σ_{i<=t} (E_t / E_i) θ_i g_i
    M_t = A_t M_0 + b_t S_0 - Σ_{i<=t} c_{t,i} θ_i g_i,
    b_t = Σ_{s<=t} (A_t / A_s) E_s,    c_{t,i} = Σ_{s=i..t} (A_t / A_s)(E_s / E_i).

Proof: S_t by induction; then M_t = A_t M_0 + Σ_{s<=t} (A_t/A_s) S_s, substitute S_s and swap
the sums over s and i. With P^A_{t,s} = A_t/A_s and P^E_{s,i} = E_s/E_i (zero above the
diagonal), ``c = P^A P^E`` and ``b = P^A E``: a product of two lower-triangular matrices of
nonnegative entries. Each ratio is exp of a *segment sum* of logs, Σ_{i<j<=s} log η_j,
computed by a masked cumulative sum (never as a difference of two cumulative sums, and never
dividing by a product that may underflow); log η = -inf (momentum off) gives exact zeros.

Every g_i is Σ_l δ^(l)_i ⊗ z^(l)_i (``mlp.l2_loss_grads``), so the retrieval y_t = M_t(q_t)
(Eq. 15, with the memory after token t) is evaluated layer by layer without per-token weights:

    W^(l)_t a_t = A_t W^(l)_0 a_t + b_t S^(l)_0 a_t - Σ_i c_{t,i} θ_i δ^(l)_i (z^(l)_i · a_t),

i.e. C×C attention-like matrices. The state handed on is (M_n, S_n) by the same formulas.
The outer loop backpropagates through it: each chunk is an ``autograd.Function`` whose
backward is written out (``_chunk_backward``), as is that of the segment products of the
gate coefficients (``_SegmentProducts``); both are differentiable again under ``create_graph``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory.mlp import (
    LossGradsTrace,
    MemoryMLPSpec,
    activate,
    activation_second_derivative,
    activation_vjp,
    l2_loss_grads_trace,
    linear,
)
from nestlearn.memory.state import MemoryWeights, Writes
from nestlearn.memory.write_bound import write_scales
from nestlearn.utils.compiling import call_compiled


def segment_sums(x: Tensor) -> Tensor:
    """``out[..., s, i] = Σ_{i<j<=s} x[j-1]`` for 0 <= i <= s <= n, ``-inf`` above the diagonal.

    x ``(..., n)`` -> ``(..., n+1, n+1)``; index 0 stands for the chunk start, so
    ``exp(out[s, 0])`` is the running product up to token s and ``exp(out[s, i])`` the
    product over tokens i+1..s.
    """
    n = x.shape[-1]
    padded = torch.cat([torch.zeros_like(x[..., :1]), x], dim=-1)
    rows = padded.unsqueeze(-1).expand(*padded.shape, n + 1)  # rows[j, i] = x_j
    ones = torch.ones(n + 1, n + 1, dtype=torch.bool, device=x.device)
    strictly_lower = torch.tril(ones, diagonal=-1)
    sums = rows.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    return sums.masked_fill(~torch.tril(ones), float("-inf"))


class _SegmentProducts(torch.autograd.Function):
    """x ``(..., n)`` -> (exp of ``segment_sums(x)[..., 1:, 1:]``, of ``[..., 1:, 0]``) with a
    hand-written backward: four passes over the n×n products instead of autograd's dozen
    (masked fills, cumsum flips, zero-filled slices). Plain differentiable ops throughout."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[-1]
        ones = torch.ones(n, n, dtype=torch.bool, device=x.device)
        rows = x.unsqueeze(-1).expand(*x.shape, n)  # rows[j, i] = x_j
        sums = rows.masked_fill(~torch.tril(ones, diagonal=-1), 0.0).cumsum(dim=-2)
        inner = sums.masked_fill(~torch.tril(ones), float("-inf")).exp()
        first = x.cumsum(-1).exp()
        ctx.save_for_backward(inner, first)
        return inner, first

    @staticmethod
    def backward(ctx: Any, g_inner: Tensor, g_first: Tensor) -> Tensor:
        inner, first = ctx.saved_tensors
        n = inner.shape[-1]
        # d inner[s, i] / d x_k = inner[s, i] for i < k <= s: sum over that rectangle per k.
        below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=inner.device), diagonal=-1)
        rect = (g_inner * inner).cumsum(-1).masked_fill(~below, 0.0).sum(-2)
        tail = (g_first * first).flip(-1).cumsum(-1).flip(-1)  # d first[s] / d x_k = first[s], k <= s
        grad: Tensor = F.pad(rect[..., :-1], (1, 0)) + tail
        return grad


def clip_factors(sq_norm: Tensor, max_norm: float | None) -> Tensor:
    """min(1, max_norm / ||g_t||) per token (1 when clipping is off); no NaN at ||g_t|| = 0."""
    if max_norm is None:
        return torch.ones_like(sq_norm)
    return max_norm * torch.rsqrt(sq_norm.clamp_min(max_norm**2))


@dataclass(frozen=True)
class ChunkCoefficients:
    """Decay / momentum coefficients of one chunk (module docstring): ``A, E, b`` are
    ``(..., n)``, ``c`` and ``momentum`` (= E_t / E_i) are ``(..., n, n)``."""

    A: Tensor
    E: Tensor
    b: Tensor
    c: Tensor
    momentum: Tensor

    @staticmethod
    def build(log_eta: Tensor, log_keep: Tensor) -> ChunkCoefficients:
        p_e, e = _SegmentProducts.apply(log_eta)  # type: ignore[no-untyped-call]
        p_a, a = _SegmentProducts.apply(log_keep)  # type: ignore[no-untyped-call]
        return ChunkCoefficients(A=a, E=e, b=(p_a @ e.unsqueeze(-1)).squeeze(-1), c=p_a @ p_e,
                                 momentum=p_e)

    def gate_inputs(self, rows: slice, advance: bool) -> tuple[Tensor, ...]:
        """What a chunk reads of them (``ChunkInputs``): A_t, b_t, c_{t,i} of the queried
        ``rows``, and with ``advance`` c_{n,i}, E_n / E_i, A_n, b_n, E_n of the last token."""
        queried = (self.A[..., rows], self.b[..., rows], self.c[..., rows, :])
        if not advance:
            return queried
        return (*queried, self.c[..., -1, :], self.momentum[..., -1, :], self.A[..., -1],
                self.b[..., -1], self.E[..., -1])


class ChunkInputs(NamedTuple):
    """The tensors one chunk reads (``memory_chunk``): M_0 and S_0 per layer; the n tokens'
    k, v, θ; the m queried tokens' q and coefficients A_t, b_t ``(..., m)``, c_{t,i}
    ``(..., m, n)``; with ``advance``, ``last`` = (c_{n,i}, E_n / E_i) ``(..., n)`` and
    (A_n, b_n, E_n) ``(...)``, else ()."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    k: Tensor
    v: Tensor
    theta: Tensor
    q: Tensor
    a_rows: Tensor
    b_rows: Tensor
    c_rows: Tensor
    last: tuple[Tensor, ...]

    def flatten(self) -> tuple[Tensor, ...]:
        return (*self.weights, *self.momentum, self.k, self.v, self.theta, self.q, self.a_rows,
                self.b_rows, self.c_rows, *self.last)

    @staticmethod
    def unflatten(flat: tuple[Tensor, ...], depth: int) -> ChunkInputs:
        k, v, theta, q, a_rows, b_rows, c_rows, *last = flat[2 * depth:]
        return ChunkInputs(flat[:depth], flat[depth:2 * depth], k, v, theta, q, a_rows, b_rows,
                           c_rows, tuple(last))


@dataclass(frozen=True)
class _ChunkTrace:
    """Intermediates of ``_chunk_forward`` that ``_chunk_backward`` reuses: the gradient pass,
    ||g_t||², the clip factors, step_i = θ_i clip_i, mix_{t,i} = c_{t,i} step_i; per retrieval
    layer its input a^(l) (a^(0) = q), hidden pre-activation, Gram a^(l) z^(l)ᵀ and the two
    operands ``left``, ``right`` of its matmul (``_scales_input``); per layer the weighted
    δ^(l) of the state update, [-wm ⊙ δ | -ws ⊙ δ]; ``kappa`` ``(..., 1)`` the write bound of
    the state after the last token (``write_bound``; one when unbounded or without ``last``)."""

    loss: LossGradsTrace
    sq: Tensor
    clip: Tensor
    step: Tensor
    mix: Tensor
    acts: tuple[Tensor, ...]
    pre: tuple[Tensor, ...]
    gram: tuple[Tensor, ...]
    left: tuple[Tensor, ...]
    right: tuple[Tensor, ...]
    scaled: tuple[Tensor, ...]
    kappa: Tensor


def _scales_input(w: Tensor) -> bool:
    """Whether a retrieval layer applies A_t, b_t to its (narrower) input rather than output.

    Input side: u = [A_t a | b_t a | -(mix ⊙ a zᵀ)] [W | S | δᵀ]ᵀ, one matmul. Output side:
    [r | s] = a [W; S]ᵀ, u = A_t r + b_t s - (mix ⊙ a zᵀ) δ. Either way the per-token scaling
    and its backward touch the smaller of (m, in) and (m, out).
    """
    return w.shape[-1] <= w.shape[-2]


def _mm_add(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` in one ``baddbmm`` (chunk tensors have one batch axis, ``_run_chunk``)."""
    return a @ b if acc is None else torch.baddbmm(acc, a, b)


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else acc + x


def _chunk_forward(x: ChunkInputs, spec: MemoryMLPSpec, grad_clip: float | None, bounded: bool,
                   fused: bool = True) -> tuple[tuple[Tensor, ...], _ChunkTrace]:
    """(y, ||g_t||², *M_n, *S_n) of one chunk (module docstring; M_n, S_n only with ``last``).
    ``bounded``: scale the write of the state handed on by its ``write_bound`` κ_n (a constant
    to the backward); reads inside the chunk use the paper's write.

    Few large matmuls run far faster on CPU than many small ones: each retrieval layer is one
    or two (``_scales_input``), the update of (M, S) one more, [wm ⊙ δ | ws ⊙ δ]ᵀ z. Without
    ``fused`` (no backward to follow, e.g. decoding one token) the retrieval skips building
    those operands, whose copies of W and S would then outweigh the matmuls they serve.
    """
    loss = l2_loss_grads_trace(x.weights, x.k, x.v, spec)
    deltas, inputs = loss.grads.deltas, loss.grads.inputs
    sq = loss.grads.sq_norm()
    clip = clip_factors(sq, grad_clip)
    step = x.theta * clip
    mix = x.c_rows * step.unsqueeze(-2)
    kappa = (write_scales(x.weights, loss, (x.last[0] * step).unsqueeze(-2), spec) if bounded and x.last
             else step.new_ones((*step.shape[:-1], 1)))
    a_t, b_t = x.a_rows.unsqueeze(-1), x.b_rows.unsqueeze(-1)
    acts, pre, gram, left, right = [x.q], [], [], [], []
    depth = len(x.weights)
    for layer, (w, s, d, z) in enumerate(zip(x.weights, x.momentum, deltas, inputs, strict=True)):
        a = acts[-1]
        gram.append(a @ z.mT)
        if not fused:
            u = _mm_add(torch.addcmul(a_t * linear(w, a), b_t, linear(s, a)), -(mix * gram[-1]), d)
        elif _scales_input(w):
            left.append(torch.cat([a_t * a, b_t * a, -(mix * gram[-1])], -1))
            right.append(torch.cat([w, s, d.mT], -1))
            u = left[-1] @ right[-1].mT
        else:
            right.append(torch.cat([w, s], -2))
            left.append(a @ right[-1].mT)
            r, s_a = left[-1][..., :w.shape[-2]], left[-1][..., w.shape[-2]:]
            u = _mm_add(torch.addcmul(a_t * r, b_t, s_a), -(mix * gram[-1]), d)
        if layer < depth - 1:
            pre.append(u)
            acts.append(activate(u, spec.activation))
    y = u + x.q if spec.residual else u
    scaled: tuple[Tensor, ...] = ()
    outs: tuple[Tensor, ...] = (y, sq)
    if x.last:
        c_n, p_n, a_n, b_n, e_n = x.last
        last_step = step * kappa
        nwm, nws = (-c_n * last_step).unsqueeze(-1), (-p_n * last_step).unsqueeze(-1)
        a_n, b_n, e_n = a_n[..., None, None], b_n[..., None, None], e_n[..., None, None]
        scaled = tuple(torch.cat([d * nwm, d * nws], -1) for d in deltas)
        new_m, new_s = [], []
        for w, s, dd, z in zip(x.weights, x.momentum, scaled, inputs, strict=True):
            update = dd.mT @ z
            new_m.append(torch.addcmul(torch.addcmul(update[..., :w.shape[-2], :], a_n, w), b_n, s))
            new_s.append(torch.addcmul(update[..., w.shape[-2]:, :], e_n, s))
        outs = (*outs, *new_m, *new_s)
    return outs, _ChunkTrace(loss, sq, clip, step, mix, tuple(acts), tuple(pre), tuple(gram),
                             tuple(left), tuple(right), scaled, kappa)


def _chunk_backward(x: ChunkInputs, tr: _ChunkTrace, spec: MemoryMLPSpec, grad_clip: float | None,
                    gy: Tensor, g_sq: Tensor | None, g_state: tuple[Tensor | None, ...],
                    ) -> tuple[Tensor | None, ...]:  # the write bound is in ``tr.kappa``
    """Vector-Jacobian product of ``_chunk_forward``: the gradients of ``x.flatten()``.

    Retrieval and state update first (they give the gradients wrt the rank-one factors δ^(l),
    z^(l), the step and the coefficients), then ||g||² and the clip, then back through the
    gradient pass (δ chain, which needs act'', then the MLP's forward chain). ``None``: an
    output that received no gradient.
    """
    depth = len(x.weights)
    deltas, inputs = tr.loss.grads.deltas, tr.loss.grads.inputs
    gw: list[Tensor | None] = [None] * depth
    gs: list[Tensor | None] = [None] * depth
    gd: list[Tensor | None] = [None] * depth
    gz: list[Tensor | None] = [None] * depth
    a_t, b_t = x.a_rows.unsqueeze(-1), x.b_rows.unsqueeze(-1)
    g_a_rows: Tensor | None = None
    g_b_rows: Tensor | None = None
    g_mix: Tensor | None = None
    gq: Tensor | None = gy if spec.residual else None
    gu = gy
    for layer in reversed(range(depth)):  # retrieval
        w, a, gram, d, z = x.weights[layer], tr.acts[layer], tr.gram[layer], deltas[layer], inputs[layer]
        n_in, n_out = w.shape[-1], w.shape[-2]
        if _scales_input(w):  # u = left rightᵀ
            g_left = gu @ tr.right[layer]
            g_a, g_b, gp = g_left[..., :n_in], g_left[..., n_in:2 * n_in], g_left[..., 2 * n_in:]
            g_a_rows = _add(g_a_rows, torch.linalg.vecdot(g_a, a))
            g_b_rows = _add(g_b_rows, torch.linalg.vecdot(g_b, a))
            g_right = gu.mT @ tr.left[layer][..., :2 * n_in]
            gw[layer], gs[layer] = g_right[..., :n_in], g_right[..., n_in:]
            gd[layer] = tr.left[layer][..., 2 * n_in:].mT @ gu  # contiguous, unlike a slice of g_right
            ga = torch.addcmul(a_t * g_a, b_t, g_b)
        else:  # u = A_t r + b_t s - (mix ⊙ gram) δ, [r | s] = left, [W; S] = right
            g_rs = torch.cat([a_t * gu, b_t * gu], -1)
            g_a_rows = _add(g_a_rows, torch.linalg.vecdot(gu, tr.left[layer][..., :n_out]))
            g_b_rows = _add(g_b_rows, torch.linalg.vecdot(gu, tr.left[layer][..., n_out:]))
            g_ws = g_rs.mT @ a
            gw[layer], gs[layer] = g_ws[..., :n_out, :], g_ws[..., n_out:, :]
            gp = gu @ d.mT
            gd[layer] = (-(tr.mix * gram)).mT @ gu
            ga = g_rs @ tr.right[layer]
        g_mix = _add(g_mix, -gp * gram)  # gp: minus the gradient wrt mix ⊙ gram
        gg = gp * tr.mix  # minus the gradient wrt gram
        gz[layer] = (-gg).mT @ a
        ga = _mm_add(ga, -gg, z)
        if layer:
            gu = activation_vjp(ga, tr.pre[layer - 1], spec.activation)
        else:
            gq = _add(gq, ga)
    assert g_mix is not None and g_a_rows is not None and g_b_rows is not None and gq is not None
    g_step = (g_mix * x.c_rows).sum(-2)
    g_last: tuple[Tensor | None, ...] = ()
    if x.last:  # M_n = A_n M_0 + b_n S_0 - Σ_i wm_i δ_i ⊗ z_i, S_n = E_n S_0 - Σ_i ws_i δ_i ⊗ z_i
        c_n, p_n, a_n, b_n, e_n = x.last
        kappa_n = tr.kappa  # a constant of the backward
        last_step = tr.step * kappa_n
        nwm, nws = (-c_n * last_step).unsqueeze(-1), (-p_n * last_step).unsqueeze(-1)
        g_wm: Tensor | None = None
        g_ws_: Tensor | None = None
        g_a_n: Tensor | None = None
        g_b_n: Tensor | None = None
        g_e_n: Tensor | None = None
        for layer in range(depth):
            gm, gsl = g_state[layer], g_state[depth + layer]
            if gm is None and gsl is None:
                continue
            w, s, d, z = x.weights[layer], x.momentum[layer], deltas[layer], inputs[layer]
            gm = torch.zeros_like(w) if gm is None else gm
            gsl = torch.zeros_like(s) if gsl is None else gsl
            gw_l, gs_l = gw[layer], gs[layer]  # set by the retrieval above
            assert gw_l is not None and gs_l is not None
            gw[layer] = torch.addcmul(gw_l, a_n[..., None, None], gm)
            gs[layer] = torch.addcmul(torch.addcmul(gs_l, b_n[..., None, None], gm),
                                      e_n[..., None, None], gsl)
            g_a_n = _add(g_a_n, torch.linalg.vecdot(gm.flatten(-2), w.flatten(-2)))
            g_b_n = _add(g_b_n, torch.linalg.vecdot(gm.flatten(-2), s.flatten(-2)))
            g_e_n = _add(g_e_n, torch.linalg.vecdot(gsl.flatten(-2), s.flatten(-2)))
            g_new = torch.cat([gm, gsl], -2)
            h = z @ g_new.mT  # the gradient wrt scaled
            hm, hs = h[..., :w.shape[-2]], h[..., w.shape[-2]:]
            g = gd[layer]
            gd[layer] = torch.addcmul(hm * nwm if g is None else torch.addcmul(g, hm, nwm), hs, nws)
            g_wm = _add(g_wm, -torch.linalg.vecdot(hm, d))
            g_ws_ = _add(g_ws_, -torch.linalg.vecdot(hs, d))
            gz[layer] = _mm_add(gz[layer], tr.scaled[layer], g_new)
        if g_wm is not None and g_ws_ is not None:
            g_step = g_step + (g_wm * c_n + g_ws_ * p_n) * kappa_n
            g_last = (g_wm * last_step, g_ws_ * last_step, g_a_n, g_b_n, g_e_n)
        else:
            g_last = (None,) * 5
    if grad_clip is not None:  # clip = grad_clip / sqrt(max(sq, grad_clip²))
        bound = grad_clip**2
        g_clip = g_step * x.theta * tr.clip / tr.sq.clamp_min(bound)
        g_sq = _add(g_sq, -0.5 * g_clip.masked_fill(tr.sq < bound, 0.0))
    if g_sq is not None:
        for layer in range(depth):  # sq = Σ_l ||δ^(l)||² ||z^(l)||²
            d, z = deltas[layer], inputs[layer]
            g = gd[layer]
            assert g is not None
            gd[layer] = torch.addcmul(g, 2 * (g_sq * z.square().sum(-1)).unsqueeze(-1), d)
            gz[layer] = _add(gz[layer], 2 * (g_sq * d.square().sum(-1)).unsqueeze(-1) * z)
    g_pre: list[Tensor] = []
    for layer in range(depth - 1):  # δ^(l) = (δ^(l+1) W^(l+1)) ⊙ act'(u^(l))
        g = gd[layer]
        assert g is not None
        g_back = g * tr.loss.slopes[layer]
        g_pre.append(g * tr.loss.back[layer]
                     * activation_second_derivative(tr.loss.pre[layer], spec.activation))
        gd[layer + 1] = _mm_add(gd[layer + 1], g_back, x.weights[layer + 1].mT)
        gw[layer + 1] = _mm_add(gw[layer + 1], deltas[layer + 1].mT, g_back)
    g_out = gd[-1]
    assert g_out is not None
    g_out = 2 * g_out  # δ^(L) = 2 (M(k) - v)
    gk: Tensor | None = g_out if spec.residual else None
    gu = g_out
    for layer in reversed(range(depth)):  # the MLP on k
        gw[layer] = _mm_add(gw[layer], gu.mT, inputs[layer])
        g = _mm_add(gz[layer], gu, x.weights[layer])
        if layer:
            gu = torch.addcmul(g_pre[layer - 1], g, tr.loss.slopes[layer - 1])
        else:
            gk = _add(gk, g)
    assert gk is not None
    g_weights = [g for g in gw if g is not None]
    g_momentum = [g for g in gs if g is not None]
    return (*g_weights, *g_momentum, gk, -g_out, g_step * tr.clip, gq, g_a_rows, g_b_rows,
            g_mix * tr.step.unsqueeze(-2), *g_last)


COMPILE_OPTION = "model.titans.memory_compile"
"""The config switch that ``call_compiled`` names when a compiled chunk fails to build."""


class _MemoryChunk(torch.autograd.Function):
    """``_chunk_forward`` with the hand-written ``_chunk_backward``: autograd through the
    chunk's many small ops cost more than its matmuls. Under ``create_graph`` the backward
    recomputes the intermediates with a graph, so it is differentiable in turn. ``compiled``:
    run both through ``torch.compile`` (``_compiled_steps``) wherever no graph is recorded, i.e.
    the forward and a plain backward; a ``create_graph`` backward stays eager."""

    @staticmethod
    def forward(ctx: Any, spec: MemoryMLPSpec, grad_clip: float | None, bounded: bool, depth: int,
                compiled: bool, *flat: Tensor) -> tuple[Tensor, ...]:
        x = ChunkInputs.unflatten(flat, depth)
        if compiled:
            outs, trace = call_compiled(COMPILE_OPTION, _compiled_steps(spec, grad_clip, bounded)[0], x)
        else:
            outs, trace = _chunk_forward(x, spec, grad_clip, bounded)
        ctx.save_for_backward(*flat)
        ctx.trace, ctx.spec, ctx.grad_clip, ctx.depth, ctx.compiled = trace, spec, grad_clip, depth, compiled
        ctx.bounded = bounded
        ctx.set_materialize_grads(False)  # skip the work for outputs nobody differentiates
        y, sq, *state = outs
        return (y, sq.clone(), *state)  # the trace keeps sq: no output may live on ctx

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, g_sq: Tensor | None,
                 *g_state: Tensor | None) -> tuple[Tensor | None, ...]:
        x = ChunkInputs.unflatten(ctx.saved_tensors, ctx.depth)
        gy = torch.zeros_like(x.q) if gy is None else gy
        if torch.is_grad_enabled():  # create_graph: recompute with a graph, eagerly
            trace = _chunk_forward(x, ctx.spec, ctx.grad_clip, ctx.bounded)[1]
            grads = _chunk_backward(x, trace, ctx.spec, ctx.grad_clip, gy, g_sq, g_state)
        elif ctx.compiled:
            grads = call_compiled(COMPILE_OPTION, _compiled_steps(ctx.spec, ctx.grad_clip, ctx.bounded)[1],
                                  x, ctx.trace, gy, g_sq, g_state)
        else:
            grads = _chunk_backward(x, ctx.trace, ctx.spec, ctx.grad_clip, gy, g_sq, g_state)
        return (None, None, None, None, None, *grads)


@functools.cache
def _compiled_steps(spec: MemoryMLPSpec, grad_clip: float | None,
                    bounded: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``_chunk_forward`` and ``_chunk_backward`` of one memory shape under ``torch.compile``
    (``NeuralMemoryConfig.compile``): inductor fuses the chunk's elementwise passes between its
    matmuls. Shapes are static (full chunks only, ``chunked_memory_scan``); a few variants
    compile, e.g. the first chunk of a call from ``initial_state`` and the state gradients that
    are ``None`` for the last chunk."""
    def forward(x: ChunkInputs) -> tuple[tuple[Tensor, ...], _ChunkTrace]:
        return _chunk_forward(x, spec, grad_clip, bounded)

    def backward(x: ChunkInputs, trace: _ChunkTrace, gy: Tensor, g_sq: Tensor | None,
                 g_state: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        return _chunk_backward(x, trace, spec, grad_clip, gy, g_sq, g_state)

    return torch.compile(forward, dynamic=False), torch.compile(backward, dynamic=False)


@dataclass(frozen=True)
class ChunkResult:
    """``y`` for the queried tokens; ``weights``/``momentum``: (M_n, S_n) after the chunk's
    last token (``None`` unless asked for); ``sq_norms``: ||g_t||² of the chunk's tokens."""

    y: Tensor
    weights: MemoryWeights | None
    momentum: MemoryWeights | None
    sq_norms: Tensor


def memory_chunk(weights: MemoryWeights, momentum: MemoryWeights, writes: Writes, q: Tensor,
                 spec: MemoryMLPSpec, grad_clip: float | None, advance: bool,
                 bounded: bool = False) -> ChunkResult:
    """One chunk from (M_0, S_0): ``writes`` are its n tokens so far; ``q`` the queries of its
    last ``q.shape[-2]`` tokens. ``advance`` also returns (M_n, S_n); ``bounded``: the
    ``write_bound``."""
    n = writes.length
    co = ChunkCoefficients.build(writes.log_eta, writes.log_keep)
    return _run_chunk(weights, momentum, writes, q, co.gate_inputs(slice(n - q.shape[-2], n), advance),
                      spec, grad_clip, bounded)


def _run_chunk(weights: MemoryWeights, momentum: MemoryWeights, writes: Writes, q: Tensor,
               gates: tuple[Tensor, ...], spec: MemoryMLPSpec, grad_clip: float | None,
               bounded: bool, compiled: bool = False) -> ChunkResult:
    """``memory_chunk`` given ``ChunkCoefficients.gate_inputs`` (advancing iff they include
    the last token's); ``compiled``: through ``_compiled_steps`` when it records a graph."""
    depth = len(weights.layers)
    a_rows, b_rows, c_rows, *last = gates
    batch = writes.theta.shape[:-1]
    # One batch axis: every matmul is then a plain bmm, without matmul's expand/reshape ops.
    flat = tuple(t.reshape(batch.numel(), *t.shape[len(batch):]) for t in ChunkInputs(
        weights.layers, momentum.layers, writes.k, writes.v, writes.theta, q, a_rows, b_rows, c_rows,
        tuple(last)).flatten())
    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        outs = _MemoryChunk.apply(spec, grad_clip, bounded, depth, compiled, *flat)  # type: ignore[no-untyped-call]
    else:
        outs = _chunk_forward(ChunkInputs.unflatten(flat, depth), spec, grad_clip, bounded, fused=False)[0]
    y, sq, *state = (t.reshape(*batch, *t.shape[1:]) for t in outs)
    if not last:
        return ChunkResult(y, None, None, sq)
    return ChunkResult(y, MemoryWeights(tuple(state[:depth])), MemoryWeights(tuple(state[depth:])), sq)


@dataclass(frozen=True)
class ScanResult:
    """Output of a scan: ``y`` ``(B, H, T, d)``; the chunk-start (M_0, S_0) and the partial
    chunk's ``buffer`` to continue from; ``sq_norms`` ||g_t||² ``(B, H, T)`` of the new tokens."""

    y: Tensor
    weights: MemoryWeights
    momentum: MemoryWeights
    buffer: Writes
    sq_norms: Tensor


def chunked_memory_scan(weights: MemoryWeights, momentum: MemoryWeights, buffer: Writes,
                        q: Tensor, writes: Writes, spec: MemoryMLPSpec, chunk_size: int,
                        grad_clip: float | None = None, compiled: bool = False,
                        bounded: bool = False) -> ScanResult:
    """Run T new tokens through the memory in chunks of ``chunk_size``.

    The stream is ``buffer`` (the ``p < C`` already-seen tokens of the current chunk, whose
    gradients are also taken at M_0) followed by ``writes``; ``q`` ``(B, H, T, d)`` are the new
    tokens' queries. A completed chunk advances (M_0, S_0); the tokens of an incomplete last
    chunk (a tail, or a sequence shorter than C) update every retrieval after them and are
    returned as the new buffer, so one call, many calls and token-by-token calls agree.
    ``compiled``: complete chunks read by all their tokens run through ``torch.compile``
    (``NeuralMemoryConfig.compile``; one static shape), the others eagerly. ``bounded``: every
    state handed on scales its chunk's write by the ``write_bound`` κ.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p = buffer.length
    stream = buffer.cat(writes)
    total = stream.length
    n_full, tail = divmod(total, chunk_size)
    sizes = [chunk_size] * n_full + ([tail] if tail else [])
    starts = range(0, total, chunk_size)
    q_sizes = [size - max(0, p - start) for start, size in zip(starts, sizes, strict=True)]
    # Split, not slice, per chunk: see ``Writes.split``. What the complete chunks read of the
    # gate coefficients is built in batched ops before the loop (it does not depend on the
    # memory) and unbound per chunk, so that its backward is one stack, not many zero-fills.
    pieces, queries = stream.split(sizes), torch.split(q, q_sizes, dim=-2)
    gates: list[tuple[Tensor, ...]] = []
    if n_full:
        co = ChunkCoefficients.build(*(t[..., :n_full * chunk_size].reshape(*t.shape[:-1], n_full, chunk_size)
                                       for t in (stream.log_eta, stream.log_keep)))
        axis = stream.theta.dim() - 1  # the chunk axis, after the batch axes
        gates = list(zip(*(t.unbind(axis) for t in co.gate_inputs(slice(None), True)), strict=True))
    ys: list[Tensor] = []
    sq: list[Tensor] = []
    for j, (piece, q_chunk) in enumerate(zip(pieces, queries, strict=True)):
        m = q_chunk.shape[-2]
        if j < n_full:
            chunk_gates = gates[j]
            if m < chunk_size:  # the first chunk continues a buffer: only its new rows
                a_rows, b_rows, c_rows, *last = chunk_gates
                chunk_gates = (a_rows[..., -m:], b_rows[..., -m:], c_rows[..., -m:, :], *last)
        elif m:
            tail_co = ChunkCoefficients.build(piece.log_eta, piece.log_keep)
            chunk_gates = tail_co.gate_inputs(slice(piece.length - m, piece.length), False)
        else:
            break  # nothing new to read in an unfinished chunk
        res = _run_chunk(weights, momentum, piece, q_chunk, chunk_gates, spec, grad_clip, bounded,
                         compiled and m == chunk_size)  # complete and read by all its tokens
        ys.append(res.y)
        sq.append(res.sq_norms[..., piece.length - m:])
        if res.weights is not None and res.momentum is not None:
            weights, momentum = res.weights, res.momentum
    y = torch.cat(ys, dim=-2) if ys else q
    sq_norms = torch.cat(sq, dim=-1) if sq else q.new_zeros(q.shape[:-1])
    return ScanResult(y, weights, momentum, stream.slice(n_full * chunk_size, total), sq_norms)


def current_memory(weights: MemoryWeights, momentum: MemoryWeights, buffer: Writes,
                   spec: MemoryMLPSpec, grad_clip: float | None = None, bounded: bool = False,
                   ) -> tuple[MemoryWeights, MemoryWeights]:
    """(M_t, S_t) after the buffered tokens, i.e. the memory as of now (for inspection)."""
    if buffer.length == 0:
        return weights, momentum
    res = memory_chunk(weights, momentum, buffer, buffer.k[..., :0, :], spec, grad_clip, advance=True,
                       bounded=bounded)
    assert res.weights is not None and res.momentum is not None
    return res.weights, res.momentum
