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
Everything is ordinary differentiable torch ops, so the outer loop backpropagates through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nestlearn.memory.mlp import MemoryMLPSpec, RankOneGrads, activate, l2_loss_grads, linear
from nestlearn.memory.state import MemoryWeights, Writes


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
        seg_e = segment_sums(log_eta).exp()
        seg_a = segment_sums(log_keep).exp()
        p_a, p_e = seg_a[..., 1:, 1:], seg_e[..., 1:, 1:]
        e = seg_e[..., 1:, 0]
        return ChunkCoefficients(A=seg_a[..., 1:, 0], E=e, b=(p_a @ e.unsqueeze(-1)).squeeze(-1),
                                 c=p_a @ p_e, momentum=p_e)

    def unbind(self) -> list[ChunkCoefficients]:
        """One ``ChunkCoefficients`` per chunk of coefficients built for a batch of chunks
        (the chunk axis right before the token axes)."""
        fields = (self.A.unbind(-2), self.E.unbind(-2), self.b.unbind(-2), self.c.unbind(-3),
                  self.momentum.unbind(-3))
        return [ChunkCoefficients(*f) for f in zip(*fields, strict=True)]


def _retrieve(q: Tensor, rows: slice, weights: MemoryWeights, momentum: MemoryWeights,
              grads: RankOneGrads, step: Tensor, co: ChunkCoefficients, spec: MemoryMLPSpec) -> Tensor:
    """y_t = M_t(q_t) for the chunk positions ``rows`` (q holds exactly those tokens)."""
    a_t = co.A[..., rows].unsqueeze(-1)
    b_t = co.b[..., rows].unsqueeze(-1)
    mix = co.c[..., rows, :] * step.unsqueeze(-2)  # c_{t,i} θ_i
    a = q
    depth = len(weights.layers)
    for layer, (w0, s0, delta, z) in enumerate(zip(weights.layers, momentum.layers, grads.deltas,
                                                    grads.inputs, strict=True)):
        u = a_t * linear(w0, a) + b_t * linear(s0, a) - (mix * (a @ z.transpose(-1, -2))) @ delta
        a = activate(u, spec.activation) if layer < depth - 1 else u
    return a + q if spec.residual else a


def _weighted_outer(grads: RankOneGrads, weight: Tensor) -> MemoryWeights:
    """Σ_i weight_i δ^(l)_i ⊗ z^(l)_i per layer, weight ``(..., n)``."""
    return MemoryWeights(tuple((d * weight.unsqueeze(-1)).transpose(-1, -2) @ z
                               for d, z in zip(grads.deltas, grads.inputs, strict=True)))


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
                 co: ChunkCoefficients | None = None) -> ChunkResult:
    """One chunk from (M_0, S_0): ``writes`` are its n tokens so far; ``q`` the queries of its
    last ``q.shape[-2]`` tokens. ``advance`` also returns (M_n, S_n). ``co``: the chunk's
    coefficients if already built (they depend on the gates only)."""
    n = writes.length
    grads = l2_loss_grads(weights.layers, writes.k, writes.v, spec)
    sq = grads.sq_norm()
    step = writes.theta * clip_factors(sq, grad_clip)
    if co is None:
        co = ChunkCoefficients.build(writes.log_eta, writes.log_keep)
    y = _retrieve(q, slice(n - q.shape[-2], n), weights, momentum, grads, step, co, spec)
    if not advance:
        return ChunkResult(y, None, None, sq)

    def last(x: Tensor) -> Tensor:  # the chunk's last token, broadcast over (out, in)
        return x[..., -1, None, None]

    a_n, b_n, e_n = last(co.A), last(co.b), last(co.E)
    m_update = _weighted_outer(grads, co.c[..., -1, :] * step)
    s_update = _weighted_outer(grads, co.momentum[..., -1, :] * step)
    new_m = MemoryWeights(tuple(a_n * w + b_n * s - u for w, s, u in zip(
        weights.layers, momentum.layers, m_update.layers, strict=True)))
    new_s = momentum.zip_map(s_update, lambda s, u: e_n * s - u)
    return ChunkResult(y, new_m, new_s, sq)


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
                        grad_clip: float | None = None) -> ScanResult:
    """Run T new tokens through the memory in chunks of ``chunk_size``.

    The stream is ``buffer`` (the ``p < C`` already-seen tokens of the current chunk, whose
    gradients are also taken at M_0) followed by ``writes``; ``q`` ``(B, H, T, d)`` are the new
    tokens' queries. A completed chunk advances (M_0, S_0); the tokens of an incomplete last
    chunk (a tail, or a sequence shorter than C) update every retrieval after them and are
    returned as the new buffer, so one call, many calls and token-by-token calls agree.
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
    # Split, not slice, per chunk: see ``Writes.split``. The gate coefficients of all complete
    # chunks are built in one batched op before the loop (they do not depend on the memory).
    pieces, queries = stream.split(sizes), torch.split(q, q_sizes, dim=-2)
    coefficients = ChunkCoefficients.build(
        *(t[..., :n_full * chunk_size].reshape(*t.shape[:-1], n_full, chunk_size)
          for t in (stream.log_eta, stream.log_keep))).unbind() if n_full else []
    ys: list[Tensor] = []
    sq: list[Tensor] = []
    for j, (piece, q_chunk) in enumerate(zip(pieces, queries, strict=True)):
        complete = j < n_full
        if not q_chunk.shape[-2] and not complete:
            break  # nothing new to read in an unfinished chunk
        res = memory_chunk(weights, momentum, piece, q_chunk, spec, grad_clip, advance=complete,
                           co=coefficients[j] if complete else None)
        ys.append(res.y)
        sq.append(res.sq_norms[..., piece.length - q_chunk.shape[-2]:])
        if res.weights is not None and res.momentum is not None:
            weights, momentum = res.weights, res.momentum
    y = torch.cat(ys, dim=-2) if ys else q
    sq_norms = torch.cat(sq, dim=-1) if sq else q.new_zeros(q.shape[:-1])
    return ScanResult(y, weights, momentum, stream.slice(n_full * chunk_size, total), sq_norms)


def current_memory(weights: MemoryWeights, momentum: MemoryWeights, buffer: Writes,
                   spec: MemoryMLPSpec, grad_clip: float | None = None,
                   ) -> tuple[MemoryWeights, MemoryWeights]:
    """(M_t, S_t) after the buffered tokens, i.e. the memory as of now (for inspection)."""
    if buffer.length == 0:
        return weights, momentum
    res = memory_chunk(weights, momentum, buffer, buffer.k[..., :0, :], spec, grad_clip, advance=True)
    assert res.weights is not None and res.momentum is not None
    return res.weights, res.momentum
