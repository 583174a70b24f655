"""The chunk update of self-referential Titans' memories: delta gradient descent with decay
and momentum over a chunk in closed form (one unit-lower-triangular solve per chunk and layer,
``self_ref`` module docstring), with a hand-written backward (``DgdLayer``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory import cpu_kernels
from nestlearn.memory.chunked import segment_sums
from nestlearn.memory.mlp import (
    MemoryMLPSpec,
    RankOneGrads,
    activate,
    activation_derivative,
    linear,
)
from nestlearn.memory.self_ref_config import COMPILE_OPTION
from nestlearn.memory.state import MemoryWeights


@dataclass(frozen=True)
class GroupState:
    """Chunk-start weights W_0 of a group of memories (``(B, H[, 4], out, in)`` per layer) and
    their momenta S_0 (``None`` without momentum)."""

    weights: MemoryWeights
    momentum: MemoryWeights | None

    def detach(self) -> GroupState:
        return GroupState(self.weights.detach(), None if self.momentum is None else self.momentum.detach())


def dgd_chunk_update(state: GroupState, grads: RankOneGrads, eta: Tensor, log_alpha: Tensor,
                     log_beta: Tensor | None, dgd: bool, kernel: bool = False,
                     bounded: bool = False, spec: MemoryMLPSpec | None = None,
                     curvature: bool = False) -> GroupState:
    """State after one chunk of n tokens of Eq. 90 (module docstring), all gradients ``grads``
    taken at the chunk start. ``eta``, ``log_alpha``, ``log_beta`` ``(..., n)`` broadcast
    against the weights' leading dims; ``log_beta`` is ignored without momentum. ``kernel``:
    solve the DGD systems of CPU tensors with ``cpu_kernels`` (``_solve``); ``bounded``: scale
    each layer's steps by its ``chunk_step_scale``; ``curvature``: normalise each layer's steps by
    its curvature (``curvature_gains``, which needs the memory's ``spec``), else by its input
    energy alone."""
    if curvature and spec is None:
        raise ValueError("the curvature step needs the memory's spec")
    momentum = None if log_beta is None or state.momentum is None else MomentumDecay.build(log_beta)
    return update_chunk(state, grads, None, eta, log_alpha, momentum, dgd, kernel, bounded, spec, curvature)


def layer_step(eta: Tensor, z: Tensor, gain: Tensor | None = None) -> Tensor:
    """The step of a layer with inputs z ``(..., n, in)``: η_t / max(1, g_t ||z_t||²) ``(..., n)``,
    g_t the layer's ``curvature_gains`` (1 when ``None``: the last layer's, or the rule without).

    Normalised by the curvature as in normalised LMS: ℓ's Gauss-Newton Hessian in the layer's
    weights is 2 JᵀJ ⊗ z zᵀ (J: the Jacobian from the layer's output to M's); along the token's
    gradient δ zᵀ it is 2 g ||z||². The DGD factor (α I - η z zᵀ) has the eigenvalue α - η||z||²
    along z, which leaves (-1, 1) once η||z||² > 1 + α. A deeper layer's input σ(W k) is not
    normalised and, without ||z||², its memory diverged in context (HOPE at outer lr 3e-3: ||z||²
    up to ~3,000 at η = 0.1); a first layer reads the unit-norm k but, behind a second layer of
    spectral norm ~2-10, can have g up to ~100, and without g a trained HOPE's M_memory diverged
    past its training length (docs/results.md). With both, η' g ||z||² <= η_t <= η_max = 1/2 per
    token, inside heavy-ball momentum's stable range (docs/architecture.md)."""
    energy = z.square().sum(-1)
    return eta / (energy if gain is None else energy * gain).clamp(min=1.0)


def curvature_gains(weights: Sequence[Tensor], grads: RankOneGrads, pre: Sequence[Tensor] | None,
                    spec: MemoryMLPSpec) -> tuple[Tensor | None, ...]:
    """g^(l)_t ``(..., n)``: how much the layers above layer l amplify the token's own gradient,
    ||J^(l)_t δ^(l)_t||² / ||δ^(l)_t||² (0 where δ = 0), J^(l)_t the Jacobian of M(k_t) in layer
    l's output u^(l) at ``weights`` (``(..., out, in)``), δ^(l)_t = ``grads.deltas[l]``; ``None``
    for the last layer (J = I). With it, g ||z||² is ℓ's Gauss-Newton curvature along the layer's
    gradient δ zᵀ, up to the factor 2 (a Rayleigh quotient of JᵀJ: at most ||J||₂², and near it
    when δ points along the stiff directions, which is when a step overshoots). ``pre[m]``: the
    pre-activations u^(m) = W^(m) z^(m) when already computed. One product per layer above, as a
    forward pass; differentiable (the outer loop sees the step it takes, as it sees η_t)."""
    slopes = [activation_derivative(linear(w, z) if pre is None else pre[m], spec.activation)
              for m, (w, z) in enumerate(zip(weights[:-1], grads.inputs[:-1], strict=True))]
    gains: list[Tensor | None] = [None] * len(weights)
    for layer in range(len(weights) - 1):
        delta = grads.deltas[layer]
        a = delta
        for m in range(layer, len(weights) - 1):
            a = linear(weights[m + 1], slopes[m] * a)
        energy = delta.square().sum(-1)
        gains[layer] = a.square().sum(-1) / torch.where(energy > 0, energy, 1.0)
    return tuple(gains)


@torch.no_grad()
def chunk_step_scale(step: Tensor, z: Tensor, gain: Tensor | None = None) -> Tensor:
    """κ = min(1, 1 / (2 λ̂)) ``(..., 1)`` for a chunk whose tokens take the steps ``step``
    ``(..., n)`` on the layer inputs z ``(..., n, in)``; λ̂ = max_j Σ_i √(η_i η_j) |z_i·z_j|, the
    Gershgorin bound of the step-weighted Gram matrix, is the chunk's largest combined step.

    Why: in the chunk form every gradient is taken at the chunk start, so along a direction the
    chunk's keys share, the n stale steps add up without the per-token correction. With DGD a
    direction then moves by about 3 λ (2 λ from the gradient of ||·||², λ from the decay), which
    must stay below 2; the per-token recurrence (n = 1, λ = η' <= η_max <= 0.5) always does, and
    is untouched. With ``gain`` (``curvature_gains``) each z_i counts as √g_i z_i, as in
    ``layer_step``. On a HOPE smoke model trained at chunk 8 the last block's M_v, M_η and M_k
    overflowed within four chunks of one sequence at chunks 4 and 8 (η reached η_max for 1% of
    the tokens), and not at chunks 1 and 2. Treated as a constant by the backward."""
    root = step.sqrt() if gain is None else (step * gain).sqrt()
    bound = ((z @ z.transpose(-1, -2)).abs() * root.unsqueeze(-1) * root.unsqueeze(-2)).sum(-1).amax(-1, keepdim=True)
    return torch.where(2 * bound > 1, 1 / (2 * bound).clamp(min=1.0), 1.0)


def update_chunk(state: GroupState, grads: RankOneGrads, reads: tuple[Tensor, ...] | None,
                 eta: Tensor, log_alpha: Tensor, momentum: MomentumDecay | None, dgd: bool,
                 kernel: bool, bounded: bool, spec: MemoryMLPSpec | None, curvature: bool) -> GroupState:
    """``dgd_chunk_update`` with the β factors built; ``reads``, when given, are the chunk-start
    reads W^(l)_0 z^(l) ``(..., n, out_l)`` (the pre-activations the gradient already computed)."""
    if state.momentum is not None and momentum is None:
        raise ValueError("a group with momentum needs its momentum decay")
    decays = _ChunkDecays.build(log_alpha, momentum if state.momentum is not None else None, kernel)
    s0s = (None,) * len(state.weights.layers) if state.momentum is None else state.momentum.layers
    ws: list[Tensor] = []
    ss: list[Tensor] = []
    gains = _gains(state, grads, reads, spec, curvature)
    for layer, (w0, s0, delta, z) in enumerate(zip(state.weights.layers, s0s, grads.deltas, grads.inputs,
                                                   strict=True)):
        step = layer_step(eta, z, gains[layer])
        co = decays.coefficients(step * chunk_step_scale(step, z, gains[layer]) if bounded else step, dgd)
        w, s = _dgd_layer(w0, s0, delta, z, None if reads is None else reads[layer], co, kernel)
        ws.append(w)
        if s is not None:
            ss.append(s)
    return GroupState(MemoryWeights(tuple(ws)), None if state.momentum is None else MemoryWeights(tuple(ss)))


def _gains(state: GroupState, grads: RankOneGrads, pre: tuple[Tensor, ...] | None,
           spec: MemoryMLPSpec | None, curvature: bool) -> tuple[Tensor | None, ...]:
    """Each layer's ``curvature_gains`` at the chunk start, all ``None`` without ``curvature``."""
    if not curvature:
        return (None,) * len(state.weights.layers)
    assert spec is not None
    return curvature_gains(state.weights.layers, grads, pre, spec)


def read_chunk(state: GroupState, grads: RankOneGrads, pre: tuple[Tensor, ...] | None, eta: Tensor,
               log_alpha: Tensor, momentum: MomentumDecay | None, dgd: bool, kernel: bool, queries: Tensor,
               spec: MemoryMLPSpec, curvature: bool) -> Tensor:
    """M_{t-1}(y_t) for the last m of a chunk's n tokens (``queries`` y ``(..., m, d)``): each
    token reads the memory with the writes of the chunk's earlier tokens applied (Eq. 83-88's
    read, with Eq. 90's chunk-start gradients), layer by layer from the closed form of W_{t-1}
    (module docstring of ``self_ref``):

        W_{t-1} y = γ_{t-1} W_0 y + b_{t-1} S_0 y - Σ_{j<t} c_{t-1,j} η_j (z_j·y) δ_j
                    - Σ_{s<t} (γ_{t-1}/γ_s) η_s (z_s·y) p_s.

    ``grads``, ``eta``, ``log_alpha``, ``momentum`` (built for n tokens) as in
    ``dgd_chunk_update``; ``pre``: the chunk-start reads W^(l)_0 z^(l), if already computed;
    ``curvature``: the steps normalised by ``curvature_gains``, as the update's.
    The steps are the paper's, never ``chunk_step_scale``'s κ: κ depends on the whole chunk,
    later tokens included, so a read through it would see the future. What compounds from chunk
    to chunk, the state, is bounded; a read inside a chunk is W_0 plus at most n stale steps
    through contracting DGD factors, and the next chunk reads the bounded state."""
    if state.momentum is not None and momentum is None:
        raise ValueError("a group with momentum needs its momentum decay")
    n, m = eta.shape[-1], queries.shape[-2]
    rows = slice(n - m, n)
    decays = _ChunkDecays.build(log_alpha, momentum if state.momentum is not None else None, kernel)
    s0s = (None,) * len(state.weights.layers) if state.momentum is None else state.momentum.layers
    option = kernel_option(kernel)
    a = queries
    gains = _gains(state, grads, pre, spec, curvature)
    for layer, (w0, s0, delta, z) in enumerate(zip(state.weights.layers, s0s, grads.deltas, grads.inputs,
                                                   strict=True)):
        co = decays.coefficients(layer_step(eta, z, gains[layer]), dgd)
        scores = kernel_matmul(a, z.transpose(-1, -2), kernel)  # [t, s] = y_t·z_s
        u = torch.addcmul(kernel_matmul(co.c_prev_eta[..., rows, :] * scores, delta, kernel),
                          co.gamma_prev[..., rows, :], linear(w0, a, option))
        if s0 is not None and co.b_prev is not None:
            u = torch.addcmul(u, co.b_prev[..., rows, :], linear(s0, a, option))
        if dgd:
            read = linear(w0, z, option) if pre is None else pre[layer]
            _, p = DgdLayer.solve(s0, delta, z, read, co.c_prev_eta, co.gamma_prev, co.decay_eta, co.b_prev,
                                  kernel)
            u = u - kernel_matmul(co.decay_eta[..., rows, :] * scores, p, kernel)
        a = activate(u, spec.activation) if layer < len(state.weights.layers) - 1 else u
    return a + queries if spec.residual else a


@dataclass(frozen=True)
class MomentumDecay:
    """The factors of a chunk that depend on the momentum decay β alone, with E_s = Π_{j<=s} β_j
    (s = 1..n): ``first`` = E_s ``(..., n, 1)``, ``ratios`` [s, i] = E_s / E_i ``(..., n, n)``,
    ``e_n`` = E_n ``(..., 1, 1)`` and ``last`` = E_n / E_j ``(..., n)``. β is constant over a
    call, so one build serves every full chunk. Separate tensors, not views of one: as inputs of
    the compiled chunk each gets its own gradient (a shared one was assembled by a layout-changing
    copy, ~0.3 ms per chunk at the pilot's shape)."""

    first: Tensor
    ratios: Tensor
    e_n: Tensor
    last: Tensor

    @staticmethod
    def build(log_beta: Tensor) -> MomentumDecay:
        n = log_beta.shape[-1]
        rows = segment_sums(log_beta).exp().split_with_sizes([1, n], dim=-2)[1]  # [s, 0] = E_s, [s, i] = E_s / E_i
        first, ratios = rows.split_with_sizes([1, n], dim=-1)
        e_n, last = rows[..., -1, :].split_with_sizes([1, n], dim=-1)
        return MomentumDecay(first.contiguous(), ratios.contiguous(), e_n.unsqueeze(-1).contiguous(),
                              last.contiguous())

    def prefix(self, n: int) -> MomentumDecay:
        """The factors of the chunk's first n tokens (β constant: a partial chunk's own)."""
        ratios = self.ratios[..., :n, :n]
        return MomentumDecay(self.first[..., :n, :], ratios, self.first[..., n - 1:n, :], ratios[..., n - 1, :])


def segment_differences(x: Tensor) -> Tensor:
    """``chunked.segment_sums(x)`` as differences of running sums, P_s - P_i with P_s = Σ_{j<=s}
    x_j: one running sum over (..., n) instead of one per column of an (n+1)×(n+1) matrix,
    which inductor leaves to a strided library call (twice per chunk, ~90 µs each at the pilot's
    shape). The differences lose |P_s|·eps of absolute precision: with x = log α_t this is a
    relative error of ~|Σ log α|·1e-7 in the decays in float32, far below that of the products."""
    n = x.shape[-1]
    running = F.pad(x.cumsum(-1), (1, 0))  # P_0 = 0 (the chunk start)
    ones = torch.ones(n + 1, n + 1, dtype=torch.bool, device=x.device)
    return (running.unsqueeze(-1) - running.unsqueeze(-2)).masked_fill(~torch.tril(ones), float("-inf"))


@dataclass(frozen=True)
class _ChunkDecays:
    """The factors of a chunk that do not depend on η: with γ_t and the extended momentum sums
    c_{t,j}, b_t of ``chunked.ChunkCoefficients`` indexed from t = 0 (the chunk start, c_0 = b_0
    = 0), one (n+1)×n product gives every c, and b is its first column times E_1 (parts taken
    with ``split``: the backward of a slice would zero-fill the whole matrix per slice). Built
    once per chunk and scaled by each layer's own step (``coefficients``)."""

    gamma_n: Tensor  # γ_n, (..., 1, 1)
    gamma_prev: Tensor  # γ_{t-1}, (..., n, 1)
    decay_prev: Tensor  # γ_{t-1}/γ_s, (..., n, n)
    decay_last: Tensor  # γ_n/γ_s, (..., 1, n)
    c_prev: Tensor  # c_{t-1,j}, (..., n, n)
    c_last: Tensor  # c_{n,j}, (..., 1, n)
    b_prev: Tensor | None  # b_{t-1}, (..., n, 1)
    b_n: Tensor | None  # b_n, (..., 1, 1)
    momentum: MomentumDecay | None

    @staticmethod
    def build(log_alpha: Tensor, momentum: MomentumDecay | None, kernel: bool = False) -> _ChunkDecays:
        n = log_alpha.shape[-1]
        # [t, 0] = γ_t, [t, s] = γ_t / γ_s for t = 0..n (0 = chunk start)
        gamma, decay = segment_differences(log_alpha).exp().split_with_sizes([1, n], dim=-1)
        gamma_prev, gamma_n = gamma.split_with_sizes([n, 1], dim=-2)
        decay_prev, decay_last = decay.split_with_sizes([n, 1], dim=-2)
        if momentum is None:  # c_{t,j} = γ_t / γ_j without momentum
            return _ChunkDecays(gamma_n, gamma_prev, decay_prev, decay_last, decay_prev, decay_last, None, None, None)
        # c_{t,j} = Σ_s (γ_t/γ_s)(E_s/E_j), and b_t = Σ_s (γ_t/γ_s) E_s = E_1 c_{t,1}: an n-wide
        # product instead of an (n+1)-wide one (1.3× faster at n = 64: 65 wide misfits the kernel)
        c = kernel_matmul(decay, momentum.ratios, kernel)
        b = c.split_with_sizes([1, n - 1], dim=-1)[0] * momentum.first.split_with_sizes([1, n - 1], dim=-2)[0]
        b_prev, b_n = b.split_with_sizes([n, 1], dim=-2)
        c_prev, c_last = c.split_with_sizes([n, 1], dim=-2)
        return _ChunkDecays(gamma_n, gamma_prev, decay_prev, decay_last, c_prev, c_last, b_prev, b_n, momentum)

    def coefficients(self, eta: Tensor, dgd: bool) -> _DgdCoefficients:
        """The factors of one layer whose tokens take the steps η ``(..., n)``."""
        eta_cols = eta.unsqueeze(-2)
        m = self.momentum
        return _DgdCoefficients(
            gamma_n=self.gamma_n, last_w=(self.c_last * eta_cols).transpose(-1, -2),
            c_prev_eta=-(self.c_prev * eta_cols), gamma_prev=self.gamma_prev,
            decay_eta=self.decay_prev * eta_cols, decay_last_eta=(self.decay_last * eta_cols).transpose(-1, -2),
            b_prev=self.b_prev, b_n=self.b_n, e_n=None if m is None else m.e_n,
            step_w=None if m is None else (m.last * eta).unsqueeze(-1), dgd=dgd)


@dataclass(frozen=True)
class _DgdCoefficients:
    """The factors of ``_dgd_layer`` for one layer (``_ChunkDecays.coefficients``), each
    broadcast against the layer's ``(..., n, ·)`` tensors."""

    gamma_n: Tensor  # γ_n, (..., 1, 1)
    last_w: Tensor  # c_{n,j} η_j, (..., n, 1)
    c_prev_eta: Tensor  # -c_{t-1,j} η_j, (..., n, n)
    gamma_prev: Tensor  # γ_{t-1}, (..., n, 1)
    decay_eta: Tensor  # (γ_{t-1}/γ_s) η_s (s < t), (..., n, n)
    decay_last_eta: Tensor  # (γ_n/γ_s) η_s, (..., n, 1)
    b_prev: Tensor | None  # b_{t-1}, (..., n, 1)
    b_n: Tensor | None  # b_n, (..., 1, 1)
    e_n: Tensor | None  # E_n, (..., 1, 1)
    step_w: Tensor | None  # (E_n / E_j) η_j, (..., n, 1)
    dgd: bool


def _dgd_layer(w0: Tensor, s0: Tensor | None, delta: Tensor, z: Tensor, read: Tensor | None,
               co: _DgdCoefficients, kernel: bool) -> tuple[Tensor, Tensor | None]:
    """(W_n, S_n) of one layer after a chunk. z may be shared by the memories stacked on a
    leading dim (size 1 there): the Gram matrix and, with it, the DGD system are then shared."""
    if co.dgd:
        args = (w0, s0, delta, z, linear(w0, z, kernel_option(kernel)) if read is None else read, co.gamma_n, co.last_w, co.c_prev_eta,
                co.gamma_prev, co.decay_eta, co.decay_last_eta, co.b_prev, co.b_n, co.e_n, co.step_w)
        # One dtype inside (autocast mixes bf16 products with fp32 weights); autograd casts back.
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in args if t is not None))
        with torch.autocast(w0.device.type, enabled=False):
            out: tuple[Tensor, Tensor | None] = DgdLayer.apply(  # type: ignore[no-untyped-call]
                kernel, *(None if t is None else t.to(dtype) for t in args))
        return out
    update = kernel_matmul((delta * co.last_w).transpose(-1, -2), z, kernel)
    if s0 is None or co.b_n is None or co.e_n is None or co.step_w is None:
        return co.gamma_n * w0 - update, None
    return (co.gamma_n * w0 + co.b_n * s0 - update,
            co.e_n * s0 - kernel_matmul((delta * co.step_w).transpose(-1, -2), z, kernel))


def kernel_option(kernel: bool) -> str | None:
    """The config switch that turns nestlearn's CPU kernels on, for ``cpu_kernels.matmul``."""
    return COMPILE_OPTION if kernel else None


def kernel_matmul(a: Tensor, b: Tensor, kernel: bool) -> Tensor:
    """``a @ b``; with ``kernel``, CPU float products run on ``cpu_kernels.matmul``."""
    return cpu_kernels.matmul(a, b, kernel_option(kernel))


def _row_sum(x: Tensor) -> Tensor:
    return x.sum(-1, keepdim=True)


def _solve(system: Tensor, rhs: Tensor, transpose: bool, kernel: bool) -> Tensor:
    """X with (I + strict_lower(system)) X = rhs (its transpose with ``transpose``): with
    ``kernel``, CPU tensors and no graph recorded, nestlearn's C++ kernel (``cpu_kernels``, ~3×
    faster here); otherwise, and whenever the solve itself must be differentiable (double
    backward), ``torch.linalg.solve_triangular``."""
    if kernel and system.device.type == "cpu" and not torch.is_grad_enabled():
        return cpu_kernels.unit_triangular_solve(system, rhs, transpose, COMPILE_OPTION)
    if transpose:
        system = system.transpose(-1, -2)
    out: Tensor = torch.linalg.solve_triangular(system, rhs, upper=transpose, unitriangular=True)
    return out


class DgdLayer(torch.autograd.Function):
    """The DGD chunk update of one layer (``_dgd_layer``) with a hand-written backward.

    Forward, with G = Z Zᵀ, Δ = [δ_t], A = -c_{t-1,j} η_j ⊙ G, L = I + strict_lower(de ⊙ G):

        rhs = A Δ + γ_{t-1} ⊙ read + b_{t-1} ⊙ Z S_0ᵀ,   P = L⁻¹ rhs,
        R = c_{n,j} η_j ⊙ Δ + (γ_n/γ_j) η_j ⊙ P,       W_n = γ_n W_0 + b_n S_0 - Rᵀ Z,
        S_n = E_n S_0 - ((E_n/E_j) η_j ⊙ Δ)ᵀ Z.

    Autograd of these ops keeps every broadcast product and accumulates into many temporaries;
    here backward saves only the inputs, G and P (R is recomputed), does one transposed solve
    and reduces broadcast gradients (e.g. the layer-1 system shared by the stacked memories)
    before multiplying. It is written with differentiable ops and, under ``create_graph``,
    rebuilds G and P from the inputs, so double backward works too.
    """

    @staticmethod
    def solve(s0: Tensor | None, delta: Tensor, z: Tensor, read: Tensor, c_prev_eta: Tensor, gamma_prev: Tensor,
              decay_eta: Tensor, b_prev: Tensor | None, kernel: bool) -> tuple[Tensor, Tensor]:
        """G and P (the DGD terms p_t)."""
        gram = kernel_matmul(z, z.transpose(-1, -2), kernel)
        rhs = torch.addcmul(kernel_matmul(c_prev_eta * gram, delta, kernel), gamma_prev, read)
        if s0 is not None and b_prev is not None:
            rhs = rhs + linear(s0, b_prev * z, kernel_option(kernel))
        return gram, _solve(decay_eta * gram, rhs, False, kernel)

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, kernel: bool, w0: Tensor, s0: Tensor | None,
                delta: Tensor, z: Tensor, read: Tensor, gamma_n: Tensor, last_w: Tensor, c_prev_eta: Tensor,
                gamma_prev: Tensor, decay_eta: Tensor, decay_last_eta: Tensor, b_prev: Tensor | None,
                b_n: Tensor | None, e_n: Tensor | None, step_w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        gram, p = DgdLayer.solve(s0, delta, z, read, c_prev_eta, gamma_prev, decay_eta, b_prev, kernel)
        rows = torch.addcmul(delta * last_w, p, decay_last_eta)
        new_w = gamma_n * w0 - kernel_matmul(rows.transpose(-1, -2), z, kernel)
        new_s = None
        if s0 is not None:
            assert b_n is not None and e_n is not None and step_w is not None
            new_w = new_w + b_n * s0
            new_s = e_n * s0 - kernel_matmul((delta * step_w).transpose(-1, -2), z, kernel)
        saved = (w0, s0, delta, z, read, gram, p, gamma_n, last_w, c_prev_eta, gamma_prev, decay_eta,
                 decay_last_eta, b_prev, b_n, e_n, step_w)
        ctx.save_for_backward(*saved)  # type: ignore[arg-type]  # None entries are allowed
        ctx.kernel = kernel  # type: ignore[attr-defined]
        return new_w, new_s

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_w: Tensor, g_s: Tensor | None,
                 ) -> tuple[Tensor | None, ...]:
        with torch.autocast(g_w.device.type, enabled=False):
            return (None, *DgdLayer._backward(ctx.saved_tensors, g_w, g_s, ctx.kernel))  # type: ignore[attr-defined]

    @staticmethod
    def _backward(saved: tuple[Tensor, ...], g_w: Tensor, g_s: Tensor | None, kernel: bool,
                  ) -> tuple[Tensor | None, ...]:
        """The gradients of the inputs; without momentum s0 and its factors are ``None`` in ``saved``."""
        (w0, s0, delta, z, read, gram, p, gamma_n, last_w, c_prev_eta, gamma_prev, decay_eta, decay_last_eta,
         b_prev, b_n, e_n, step_w) = saved
        if torch.is_grad_enabled():  # double backward: G and P as functions of the inputs
            gram, p = DgdLayer.solve(s0, delta, z, read, c_prev_eta, gamma_prev, decay_eta, b_prev, kernel)
        # Signs are moved onto the small (n, 1) and (1, 1) factors: h = -dL/dR, r = -dL/d(rhs),
        # acc = -dL/dZ (before the Gram term).
        rows = torch.addcmul(delta * last_w, p, decay_last_eta)
        h = kernel_matmul(z, g_w.transpose(-1, -2), kernel)
        acc = kernel_matmul(rows, g_w, kernel)
        g_delta = h * -last_w
        g_s0 = g_bp = g_bn = g_en = g_sw = None
        if s0 is not None:
            assert g_s is not None
            h_s = kernel_matmul(z, g_s.transpose(-1, -2), kernel)
            acc = acc + kernel_matmul(delta * step_w, g_s, kernel)
            g_delta = torch.addcmul(g_delta, h_s, step_w, value=-1)
            g_sw = -_row_sum(h_s * delta)
            g_s0 = torch.addcmul(b_n * g_w, e_n, g_s)
            g_bn = (g_w * s0).sum((-2, -1), keepdim=True)
            g_en = (g_s * s0).sum((-2, -1), keepdim=True)
        system = decay_eta * gram
        r = _solve(system, h * decay_last_eta, True, kernel)
        g_system = kernel_matmul(r, p.transpose(-1, -2), kernel).sum_to_size(system.shape).tril(-1)
        q = kernel_matmul(r, delta.transpose(-1, -2), kernel)  # -dL/dA
        g_delta = g_delta - kernel_matmul((c_prev_eta * gram).transpose(-1, -2), r, kernel)
        g_gram = (g_system * decay_eta).sum_to_size(gram.shape) - (q * c_prev_eta).sum_to_size(gram.shape)
        if s0 is not None:
            u = kernel_matmul(r, s0, kernel)
            acc = torch.addcmul(acc, b_prev, u)
            g_bp = -_row_sum(z * u)
            g_s0 = g_s0 - kernel_matmul((b_prev * r).transpose(-1, -2), z, kernel)
        g_z = kernel_matmul(g_gram + g_gram.transpose(-1, -2), z, kernel) - acc.sum_to_size(z.shape)

        def fit(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if g is None or like is None else g.sum_to_size(like.shape)

        return (fit(gamma_n * g_w, w0), fit(g_s0, s0), fit(g_delta, delta), g_z, fit(r * -gamma_prev, read),
                fit((g_w * w0).sum((-2, -1), keepdim=True), gamma_n), fit(-_row_sum(h * delta), last_w),
                fit(-(q * gram), c_prev_eta), fit(-_row_sum(r * read), gamma_prev),
                fit(g_system * gram, decay_eta), fit(-_row_sum(h * p), decay_last_eta),
                fit(g_bp, b_prev), fit(g_bn, b_n), fit(g_en, e_n), fit(g_sw, step_w))

