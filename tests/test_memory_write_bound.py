"""The write bound (``memory.write_bound``): its closed form equals the slow definition, the
bounded chunk-wise scan equals the bounded per-token reference (reads, state handed on,
gradients, streaming) in float64, it leaves a write that does not overshoot untouched, and it
keeps a memory fed aligned keys from overflowing where the unbounded write does."""

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
)
from nestlearn.memory.mlp import l2_loss_grads_trace
from nestlearn.memory.write_bound import reference_write_scale, write_scales
from test_memory_chunked import (
    F64,
    B,
    D,
    H,
    _all_inputs,
    _rebuild,
    assert_weights_close,
    make_inputs,
)

SPECS = [MemoryMLPSpec(D, 1), MemoryMLPSpec(D, 2, 2.0), MemoryMLPSpec(D, 3, 1.5, "gelu", residual=True)]


def aligned(writes: Writes, spread: float = 0.3, theta: float = 0.5) -> Writes:
    """The writes with keys near one shared direction (as in deep layers on real text) and
    large θ: a chunk's steps pile up, so the bound acts."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(D, generator=gen, dtype=F64)
    k = F.normalize(shared + spread * torch.randn(writes.k.shape, generator=gen, dtype=F64), dim=-1)
    return Writes(k, writes.v, theta + 0 * writes.theta, writes.log_eta, writes.log_keep)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_closed_form_equals_jvp_definition(spec: MemoryMLPSpec) -> None:
    """κ of the write after each prefix of a chunk: rank-one closed form == autograd gradients
    and JVPs."""
    n = 6
    weights, _, _, writes = make_inputs(spec, n, seed=3)
    writes = aligned(writes)
    co = ChunkCoefficients.build(writes.log_eta, writes.log_keep)
    w = co.c * writes.theta.unsqueeze(-2)  # (B, H, n, n): row t weighs the chunk's gradients
    trace = l2_loss_grads_trace(weights.layers, writes.k, writes.v, spec)
    got = write_scales(weights.layers, trace, w, spec)
    grads = trace.grads
    for t in range(n):
        write = MemoryWeights(tuple(-(w[..., t, :, None] * d).mT @ z for d, z in
                                    zip(grads.deltas, grads.inputs, strict=True)))
        expected = reference_write_scale(weights, writes.k, write, w[..., t, :], spec)
        torch.testing.assert_close(got[..., t], expected, rtol=1e-10, atol=1e-12)
    assert (got < 0.9).any() and (got <= 1).all() and (got > 0).all()


@pytest.mark.parametrize(("chunk", "length"), [(1, 7), (3, 9), (4, 10), (16, 5)])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bounded_scan_equals_reference(chunk: int, length: int, spec: MemoryMLPSpec) -> None:
    """Chunk sizes 1, a divisor and a non-divisor of the length, and longer than it."""
    weights, mom, q, writes = make_inputs(spec, length, seed=chunk + length)
    writes = aligned(writes)
    y_ref, m_ref, s_ref = reference_memory_scan(weights, mom, q, writes, spec, chunk, 0.9, bounded=True)
    res = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, chunk, 0.9, bounded=True)
    torch.testing.assert_close(res.y, y_ref, rtol=1e-10, atol=1e-10)
    m_now, s_now = current_memory(res.weights, res.momentum, res.buffer, spec, 0.9, bounded=True)
    assert_weights_close(m_now, m_ref, 1e-10)
    assert_weights_close(s_now, s_ref, 1e-10)
    if chunk > 1:  # the bound acted: the unbounded scan hands on another state
        free = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, chunk, 0.9)
        m_free, _ = current_memory(free.weights, free.momentum, free.buffer, spec, 0.9)
        assert max((a - b).abs().max() for a, b in zip(m_free.layers, m_now.layers, strict=True)) > 1e-3


@pytest.mark.parametrize(("chunk", "spec"), [(3, SPECS[1]), (4, SPECS[2]), (1, SPECS[1])], ids=str)
def test_bounded_gradients_equal_reference(chunk: int, spec: MemoryMLPSpec) -> None:
    """The hand-written backward (κ a constant) against autograd through the reference."""
    inputs = make_inputs(spec, 10, seed=chunk)
    leaves = [x.requires_grad_() for x in _all_inputs(*inputs[:3], aligned(inputs[3]))]
    w, s, q, writes = _rebuild(leaves, spec.depth)
    probe = torch.randn(B, H, 10, D, dtype=F64)

    def loss(y: Tensor, m: MemoryWeights, mom: MemoryWeights) -> Tensor:
        return (y * probe).sum() + m.sq_norm().sum() + 0.3 * mom.sq_norm().sum()

    y_ref, m_ref, s_ref = reference_memory_scan(w, s, q, writes, spec, chunk, 0.9, bounded=True)
    expected = torch.autograd.grad(loss(y_ref, m_ref, s_ref), leaves)
    res = chunked_memory_scan(w, s, writes.slice(0, 0), q, writes, spec, chunk, 0.9, bounded=True)
    m_now, s_now = current_memory(res.weights, res.momentum, res.buffer, spec, 0.9, bounded=True)
    got = torch.autograd.grad(loss(res.y, m_now, s_now), leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_bounded_streaming_equals_one_call() -> None:
    spec = SPECS[1]
    weights, mom, q, writes = make_inputs(spec, 13, seed=11)
    writes = aligned(writes)
    full = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 4, bounded=True)
    ys, w, s, buf = [], weights, mom, writes.slice(0, 0)
    for start, end in [(0, 1), (1, 2), (2, 7), (7, 8), (8, 13)]:
        part = chunked_memory_scan(w, s, buf, q[..., start:end, :], writes.slice(start, end), spec, 4,
                                   bounded=True)
        ys.append(part.y)
        w, s, buf = part.weights, part.momentum, part.buffer
    torch.testing.assert_close(torch.cat(ys, -2), full.y, rtol=1e-12, atol=1e-12)
    assert_weights_close(w, full.weights, 1e-12)


def test_one_token_of_a_linear_memory_is_never_bounded() -> None:
    """ε* = 1 / (2θ) for a unit key: with θ <= 0.5 the per-token recurrence is the paper's."""
    spec = SPECS[0]
    weights, mom, q, writes = make_inputs(spec, 9, seed=5)
    bounded = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 1, bounded=True)
    free = chunked_memory_scan(weights, mom, writes.slice(0, 0), q, writes, spec, 1)
    torch.testing.assert_close(bounded.y, free.y, rtol=0, atol=0)


def test_aligned_keys_overflow_without_the_bound_and_not_with_it() -> None:
    """The failure on real text, in miniature: 2-layer memory, chunks of 16 keys that share a
    direction, θ = 0.1, η ≈ 0.5. The unbounded write grows the hidden layer until it overflows;
    the bounded one fits the values."""
    spec = MemoryMLPSpec(8, 2, 2.0)
    gen = torch.Generator().manual_seed(1)
    t = 512
    shared = torch.randn(8, generator=gen)
    k = F.normalize(shared + 0.3 * torch.randn(1, 1, t, 8, generator=gen), dim=-1)
    v = torch.randn(1, 1, t, 8, generator=gen)
    writes = Writes(k, v, torch.full((1, 1, t), 0.1), torch.full((1, 1, t), math.log(0.5)),
                    torch.full((1, 1, t), math.log(0.998)))
    weights = MemoryWeights(tuple(torch.randn(1, 1, o, i, generator=gen) / math.sqrt(i) for o, i in spec.shapes()))
    mom = weights.map(torch.zeros_like)
    with torch.no_grad():
        free = chunked_memory_scan(weights, mom, writes.slice(0, 0), k, writes, spec, 16)
        bounded = chunked_memory_scan(weights, mom, writes.slice(0, 0), k, writes, spec, 16, bounded=True)
    assert not torch.isfinite(free.y).all() or free.y.abs().max() > 1e6
    assert torch.isfinite(bounded.y).all() and bounded.y.abs().max() < 10
