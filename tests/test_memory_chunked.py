"""The chunk-wise parallel scan equals the per-token reference: outputs, final memory and
gradients, in float64, over chunk sizes with a tail and a sequence shorter than one chunk."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory import (
    ChunkCoefficients,
    MemoryMLPSpec,
    MemoryWeights,
    Writes,
    chunked_memory_scan,
    current_memory,
    reference_memory_scan,
    segment_sums,
)

B, H, D = 2, 2, 4
F64 = torch.float64


def make_inputs(spec: MemoryMLPSpec, t: int, seed: int, momentum: bool = True, forgetting: bool = True,
                batch: int = B, heads: int = H) -> tuple[MemoryWeights, MemoryWeights, Tensor, Writes]:
    """Random M_0, S_0, queries and writes (unit keys, θ in [0, 0.5], data-dependent η, α)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, d = batch, heads, spec.dim

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    weights = MemoryWeights(tuple(randn(b, h, o, i) * 1.5 / math.sqrt(i) for o, i in spec.shapes()))
    mom = weights.map(lambda w: 0.1 * randn(*w.shape))
    q = randn(b, h, t, d)
    k = F.normalize(randn(b, h, t, d), dim=-1)
    theta = 0.5 * torch.rand(b, h, t, generator=gen, dtype=F64)
    log_eta = F.logsigmoid(randn(b, h, t)) if momentum else torch.full((b, h, t), -math.inf, dtype=F64)
    log_keep = F.logsigmoid(randn(b, h, t) + 2) if forgetting else torch.zeros(b, h, t, dtype=F64)
    return weights, mom, q, Writes(k, randn(b, h, t, d), theta, log_eta, log_keep)


def assert_weights_close(a: MemoryWeights, b: MemoryWeights, tol: float) -> None:
    for x, y in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_segment_sums_are_segment_products() -> None:
    x = torch.randn(3, 6, dtype=F64)
    seg = segment_sums(x)
    for s in range(7):
        for i in range(7):
            expected = x[:, i:s].sum(-1) if i <= s else torch.full((3,), -math.inf, dtype=F64)
            torch.testing.assert_close(seg[:, s, i], expected)


def test_coefficients_match_definitions() -> None:
    """A_t, E_t, b_t = Σ_s (A_t/A_s) E_s, c_{t,i} = Σ_{s=i..t} (A_t/A_s)(E_s/E_i)."""
    n = 5
    eta, keep = torch.rand(n, dtype=F64) * 0.9 + 0.05, torch.rand(n, dtype=F64) * 0.9 + 0.05
    co = ChunkCoefficients.build(eta.log(), keep.log())
    E, A = torch.cumprod(eta, 0), torch.cumprod(keep, 0)
    torch.testing.assert_close(co.E, E)
    torch.testing.assert_close(co.A, A)
    for t in range(n):
        torch.testing.assert_close(co.b[t], sum(A[t] / A[s] * E[s] for s in range(t + 1)))
        for i in range(n):
            c = sum(A[t] / A[s] * E[s] / E[i] for s in range(i, t + 1)) if i <= t else 0.0
            torch.testing.assert_close(co.c[t, i], torch.as_tensor(c, dtype=F64))


def test_coefficients_stable_for_tiny_gates() -> None:
    """Products that underflow (η ≈ e^-800) give zeros, never NaN (no division by E_i)."""
    log_eta = torch.full((64,), -800.0, dtype=F64)
    co = ChunkCoefficients.build(log_eta, torch.full((64,), -50.0, dtype=F64))
    assert torch.isfinite(co.c).all() and torch.isfinite(co.b).all()
    torch.testing.assert_close(co.momentum, torch.eye(64, dtype=F64))


def test_coefficient_gradients() -> None:
    """The hand-written backward of the segment products, once and twice differentiated."""
    gen = torch.Generator().manual_seed(2)
    log_eta = F.logsigmoid(torch.randn(2, 5, generator=gen, dtype=F64)).requires_grad_()
    log_keep = F.logsigmoid(torch.randn(2, 5, generator=gen, dtype=F64) + 2).requires_grad_()

    def fn(le: Tensor, lk: Tensor) -> tuple[Tensor, ...]:
        co = ChunkCoefficients.build(le, lk)
        return co.A, co.E, co.b, co.c, co.momentum

    assert torch.autograd.gradcheck(fn, (log_eta, log_keep))
    assert torch.autograd.gradgradcheck(fn, (log_eta, log_keep))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_chunk_one_equals_per_token_recurrence(depth: int, clip: float | None) -> None:
    spec = MemoryMLPSpec(D, depth, 2.0)
    weights, mom, q, writes = make_inputs(spec, 9, seed=depth)
    y_ref, m_ref, s_ref = reference_memory_scan(weights, mom, q, writes, spec, 1, clip)
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 1, clip)
    assert res.buffer.length == 0
    assert y_ref.abs().max() > 0.1
    torch.testing.assert_close(res.y, y_ref, rtol=1e-10, atol=1e-10)
    assert_weights_close(res.weights, m_ref, 1e-10)
    assert_weights_close(res.momentum, s_ref, 1e-10)


CASES = [(c, t) for c in (2, 3, 4, 8) for t in (11, 3)]


@pytest.mark.parametrize(("chunk", "length"), CASES)
@pytest.mark.parametrize("spec", [MemoryMLPSpec(D, 1), MemoryMLPSpec(D, 2, 2.0),
                                  MemoryMLPSpec(D, 2, 2.0, "gelu", residual=True)], ids=str)
def test_chunked_equals_chunked_reference(chunk: int, length: int, spec: MemoryMLPSpec) -> None:
    weights, mom, q, writes = make_inputs(spec, length, seed=chunk * 100 + length)
    y_ref, m_ref, s_ref = reference_memory_scan(weights, mom, q, writes, spec, chunk, 0.7)
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, chunk, 0.7)
    torch.testing.assert_close(res.y, y_ref, rtol=1e-10, atol=1e-10)
    assert res.buffer.length == length % chunk
    m_now, s_now = current_memory(res.weights, res.momentum, res.buffer, spec, 0.7)
    assert_weights_close(m_now, m_ref, 1e-10)
    assert_weights_close(s_now, s_ref, 1e-10)


@pytest.mark.parametrize(("momentum", "forgetting"), [(False, True), (True, False), (False, False)])
def test_options_off_equal_reference(momentum: bool, forgetting: bool) -> None:
    spec = MemoryMLPSpec(D, 2, 2.0)
    weights, mom, q, writes = make_inputs(spec, 10, 7, momentum, forgetting)
    y_ref, *_ = reference_memory_scan(weights, mom, q, writes, spec, 4)
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 4)
    torch.testing.assert_close(res.y, y_ref, rtol=1e-10, atol=1e-10)


def test_no_momentum_no_forgetting_is_minibatch_gd() -> None:
    """η = α = 0, linear memory, one chunk: M_t = M_0 - Σ_{i<=t} θ_i 2 (M_0 k_i - v_i) k_iᵀ."""
    spec = MemoryMLPSpec(D, 1)
    weights, mom, q, writes = make_inputs(spec, 6, 3, momentum=False, forgetting=False)
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 6)
    w0 = weights.layers[0]
    grads = 2 * (writes.k @ w0.transpose(-1, -2) - writes.v).unsqueeze(-1) * writes.k.unsqueeze(-2)
    w_t = w0.unsqueeze(2) - (writes.theta[..., None, None] * grads).cumsum(2)  # (B, H, T, D, D)
    torch.testing.assert_close(res.y, (w_t @ q.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(res.weights.layers[0], w_t[:, :, -1])


def test_momentum_and_decay_follow_eq_13() -> None:
    """Linear memory, constant η, α, C = 1, zero gradient (v = M k): S decays by η, M by 1-α."""
    spec = MemoryMLPSpec(D, 1)
    weights, mom, q, writes = make_inputs(spec, 3, 4)
    v = writes.k @ weights.layers[0].transpose(-1, -2)
    eta, keep = 0.5, 0.9
    writes = Writes(writes.k[..., :1, :], v[..., :1, :], writes.theta[..., :1],
                    torch.full((B, H, 1), math.log(eta), dtype=F64),
                    torch.full((B, H, 1), math.log(keep), dtype=F64))
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q[..., :1, :], writes, spec, 1)
    torch.testing.assert_close(res.momentum.layers[0], eta * mom.layers[0])
    torch.testing.assert_close(res.weights.layers[0], keep * weights.layers[0] + eta * mom.layers[0])


def test_forgetting_one_clears_memory() -> None:
    spec = MemoryMLPSpec(D, 1)
    weights, mom, q, writes = make_inputs(spec, 4, 5, momentum=False)
    writes = Writes(writes.k, writes.v, writes.theta, writes.log_eta,
                    torch.full_like(writes.log_keep, -math.inf))
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 4)
    last = -2 * writes.theta[..., -1, None, None] * (
        (writes.k[..., -1:, :] @ weights.layers[0].transpose(-1, -2) - writes.v[..., -1:, :]
         ).transpose(-1, -2) @ writes.k[..., -1:, :])
    torch.testing.assert_close(res.weights.layers[0], last)


def test_streaming_calls_equal_one_call() -> None:
    spec = MemoryMLPSpec(D, 2, 2.0)
    weights, mom, q, writes = make_inputs(spec, 13, 11)
    full = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 4)
    ys, w, s, buf = [], weights, mom, writes.slice(0, 0)
    for start, end in [(0, 1), (1, 2), (2, 7), (7, 8), (8, 13)]:
        part = chunked_memory_scan(w, s, buf, q[..., start:end, :], writes.slice(start, end), spec, 4)
        ys.append(part.y)
        w, s, buf = part.weights, part.momentum, part.buffer
    torch.testing.assert_close(torch.cat(ys, -2), full.y, rtol=1e-12, atol=1e-12)
    assert_weights_close(w, full.weights, 1e-12)


def _all_inputs(weights: MemoryWeights, mom: MemoryWeights, q: Tensor, writes: Writes) -> list[Tensor]:
    return [*weights.layers, *mom.layers, q, writes.k, writes.v, writes.theta, writes.log_eta,
            writes.log_keep]


def _rebuild(xs: list[Tensor], depth: int) -> tuple[MemoryWeights, MemoryWeights, Tensor, Writes]:
    w, s = MemoryWeights(tuple(xs[:depth])), MemoryWeights(tuple(xs[depth:2 * depth]))
    return w, s, xs[2 * depth], Writes(*xs[2 * depth + 1:])


GRAD_CASES = [(depth, mom, forget, clip, chunk) for depth in (1, 2) for mom, forget in
              [(True, True), (False, True), (True, False), (False, False)]
              for clip in (None, 0.7) for chunk in (3, 16)]


@pytest.mark.parametrize(("depth", "momentum", "forgetting", "clip", "chunk"),
                         [*GRAD_CASES, (3, True, True, 0.7, 4), (3, False, True, None, 8)])
def test_gradients_equal_reference_all_options(depth: int, momentum: bool, forgetting: bool,
                                               clip: float | None, chunk: int) -> None:
    """The hand-written chunk backward against autograd through the reference, for a tail
    (T=10, C=3) and a sequence shorter than one chunk (C=16); depth 3 with GELU and residual."""
    spec = MemoryMLPSpec(D, depth, 2.0, "gelu" if depth == 3 else "silu", residual=depth == 3)
    inputs = make_inputs(spec, 10, depth * 10 + chunk, momentum, forgetting)
    leaves = [x.requires_grad_() for x in _all_inputs(*inputs)]
    w, s, q, writes = _rebuild(leaves, depth)
    probe = torch.randn(B, H, 10, D, dtype=F64)

    def loss(y: Tensor, m: MemoryWeights, mom: MemoryWeights) -> Tensor:
        return (y * probe).sum() + m.sq_norm().sum() + 0.3 * mom.sq_norm().sum()

    y_ref, m_ref, s_ref = reference_memory_scan(w, s, q, writes, spec, chunk, clip)
    expected = torch.autograd.grad(loss(y_ref, m_ref, s_ref), leaves)
    res = chunked_memory_scan(w, s, writes.slice(0, 0), q, writes, spec, chunk, clip)
    m_now, s_now = current_memory(res.weights, res.momentum, res.buffer, spec, clip)
    got = torch.autograd.grad(loss(res.y, m_now, s_now), leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk", [3, 8])
def test_gradients_equal_reference(chunk: int) -> None:
    spec = MemoryMLPSpec(D, 2, 2.0)
    leaves = [x.requires_grad_() for x in _all_inputs(*make_inputs(spec, 10, chunk))]
    w, s, q, writes = _rebuild(leaves, spec.depth)
    probe = torch.randn(B, H, 10, D, dtype=F64)

    def loss(y: Tensor, m: MemoryWeights) -> Tensor:
        return (y * probe).sum() + m.sq_norm().sum()

    y_ref, m_ref, _ = reference_memory_scan(w, s, q, writes, spec, chunk, 0.7)
    expected = torch.autograd.grad(loss(y_ref, m_ref), leaves)
    res = chunked_memory_scan(w, s, writes.slice(0, 0), q, writes, spec, chunk, 0.7)
    m_now, _ = current_memory(res.weights, res.momentum, res.buffer, spec, 0.7)
    got = torch.autograd.grad(loss(res.y, m_now), leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_gradcheck_tiny_memory() -> None:
    spec = MemoryMLPSpec(2, 2, 1.5)
    xs = [x.requires_grad_() for x in _all_inputs(*make_inputs(spec, 5, 2, batch=1, heads=1))]

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        w, s, qq, wr = _rebuild(list(args), spec.depth)
        res = chunked_memory_scan(w, s, wr.slice(0, 0), qq, wr, spec, 2, 0.8)
        return (res.y, *res.weights.layers, *res.momentum.layers)

    assert torch.autograd.gradcheck(fn, tuple(xs))


@pytest.mark.parametrize(("spec", "chunk", "clip", "momentum"), [
    (MemoryMLPSpec(2, 1), 2, None, True),
    (MemoryMLPSpec(2, 2, 1.5), 8, 0.8, True),
    (MemoryMLPSpec(2, 2, 1.5), 3, 0.8, False),
    (MemoryMLPSpec(2, 3, 1.0, "gelu", residual=True), 2, 0.8, True),
], ids=str)
def test_gradcheck_chunk_backward(spec: MemoryMLPSpec, chunk: int, clip: float | None,
                                  momentum: bool) -> None:
    """Every output (y, ||g_t||², M, S) against finite differences, with a tail chunk."""
    xs = [x.requires_grad_() for x in _all_inputs(*make_inputs(spec, 5, chunk, momentum,
                                                                batch=1, heads=1))]
    if not momentum:
        xs[-2].requires_grad_(False)  # log η = -inf: no finite differences

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        w, s, qq, wr = _rebuild(list(args), spec.depth)
        res = chunked_memory_scan(w, s, wr.slice(0, 0), qq, wr, spec, chunk, clip)
        return (res.y, res.sq_norms, *res.weights.layers, *res.momentum.layers)

    assert torch.autograd.gradcheck(fn, tuple(xs))


def test_gradgradcheck_chunk_backward() -> None:
    """Double backward (``create_graph``, e.g. HOPE's in-context CMS above a Titans memory)."""
    spec = MemoryMLPSpec(2, 2, 1.0)
    xs = [x.requires_grad_() for x in _all_inputs(*make_inputs(spec, 3, 9, batch=1, heads=1))]

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        w, s, qq, wr = _rebuild(list(args), spec.depth)
        res = chunked_memory_scan(w, s, wr.slice(0, 0), qq, wr, spec, 2, 0.8)
        return (res.y, *res.weights.layers)

    assert torch.autograd.gradgradcheck(fn, tuple(xs))
