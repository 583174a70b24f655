"""Self-referential Titans: the chunk-wise fast path equals the per-token reference (outputs and
gradients, float64, several chunk sizes with tails and T < C), streaming is exact, the chunk
algebra equals the literal recurrences (DGD on/off, momentum on/off), and the layer learns to
recall key/value pairs in context."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import profile

from nestlearn.memory import self_ref
from nestlearn.memory.dgd_chunk import (
    DgdLayer,
    GroupState,
    chunk_step_scale,
    dgd_chunk_update,
    layer_step,
    segment_differences,
)
from nestlearn.memory.mlp import MemoryMLPSpec, RankOneGrads, l2_loss_grads
from nestlearn.memory.self_ref import SelfRefState, SelfRefTitans, SelfRefTitansConfig
from nestlearn.memory.self_ref_reference import reference_self_ref
from nestlearn.memory.state import MemoryWeights

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64




def make_layer(seed: int = 0, **overrides: object) -> SelfRefTitans:
    """A tiny float64 layer with sizeable steps (η ≈ 0.16) so that the updates matter."""
    options: dict[str, object] = dict(d_model=8, heads=2, head_dim=4, depth=2, expansion=1.5,
                                      memory_chunk_size=1, other_chunk_size=1, eta_max=0.6)
    options.update(overrides)
    torch.manual_seed(seed)
    layer = SelfRefTitans(SelfRefTitansConfig(**options)).to(F64)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.readout_bias[0].fill_(-1.0)
        if layer.config.weight_decay:
            layer.readout_bias[1].fill_(2.0)
        if layer.conv_weight is not None:
            layer.conv_weight.add_(0.3 * torch.randn_like(layer.conv_weight))
        if layer.momentum_logit is not None:
            layer.momentum_logit.normal_()
        if layer.to_x is not None:
            layer.to_x.weight.add_(0.3 * torch.randn_like(layer.to_x.weight))
    return layer


def inputs(t: int, seed: int = 1, batch: int = 2) -> Tensor:
    return 0.4 * torch.randn(batch, t, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def assert_states_close(a: SelfRefState, b: SelfRefState) -> None:
    pairs = [(a.other_buffer, b.other_buffer), *zip(a.memory_buffer._tensors(), b.memory_buffer._tensors(),
                                                     strict=True)]
    for ga, gb in ((a.other, b.other), (a.memory, b.memory)):
        pairs += list(zip(ga.weights.layers, gb.weights.layers, strict=True))
        if ga.momentum is not None and gb.momentum is not None:
            pairs += list(zip(ga.momentum.layers, gb.momentum.layers, strict=True))
    if a.conv_cache is not None and b.conv_cache is not None:
        pairs.append((a.conv_cache, b.conv_cache))
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_segment_differences_equal_segment_sums() -> None:
    """The chunk's log-decays as differences of one running sum equal ``segment_sums`` (a running
    sum per column), values and gradients, including the -inf above the diagonal."""
    from nestlearn.memory.chunked import segment_sums

    x = -torch.rand(2, 3, 9, dtype=F64, requires_grad=True)
    fast, slow = segment_differences(x), segment_sums(x)
    assert torch.equal(fast.isinf(), slow.isinf())
    finite = ~slow.isinf()
    torch.testing.assert_close(fast[finite], slow[finite])
    weights = torch.randn(fast.shape, dtype=F64)
    (g_fast,) = torch.autograd.grad(fast.exp().mul(weights).sum(), x)
    (g_slow,) = torch.autograd.grad(slow.exp().mul(weights).sum(), x)
    torch.testing.assert_close(g_fast, g_slow)


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("dgd", [True, False])
def test_per_token_fast_path_equals_reference(momentum: bool, dgd: bool) -> None:
    layer = make_layer(momentum=momentum, dgd=dgd)
    x = inputs(9)
    y, _ = layer(x)
    assert y.abs().max() < 1e3
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("other_chunk", "memory_chunk", "t"), [
    (4, 4, 11), (3, 5, 11), (8, 2, 13), (16, 16, 7), (1, 6, 10), (5, 1, 10)])
@pytest.mark.parametrize("in_chunk_reads", [True, False])
def test_chunked_fast_path_equals_chunkwise_reference(other_chunk: int, memory_chunk: int, t: int,
                                                      in_chunk_reads: bool) -> None:
    layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk, in_chunk_reads=in_chunk_reads)
    x = inputs(t)
    y, _ = layer(x)
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)


def assert_outer_grads_match_reference(layer: SelfRefTitans, x: Tensor, y: Tensor,
                                       allow_unused: bool = False) -> None:
    """Gradients of a squared error of the fast output ``y`` (of ``x``) w.r.t. every parameter
    and ``x`` equal the reference path's, and none is zero; with ``allow_unused`` a parameter
    may get no gradient, in both paths alike."""
    target = inputs(x.shape[1], seed=5)
    names = [n for n, _ in layer.named_parameters()]
    params = [*layer.parameters(), x]
    fast = torch.autograd.grad((y - target).square().sum(), params, allow_unused=allow_unused)
    ref = torch.autograd.grad((reference_self_ref(layer, x) - target).square().sum(), params,
                              allow_unused=allow_unused)
    for name, g_fast, g_ref in zip([*names, "x"], fast, ref, strict=True):
        if allow_unused and g_ref is None:
            assert g_fast is None, name
            continue
        assert g_ref is not None and g_fast is not None and g_ref.abs().max() > 0, name
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-10, msg=name)


ABLATIONS = {
    "static_k": {"static_projections": ("q", "k")},
    "static_v": {"static_projections": ("q", "v")},
    "static_kvq": {"static_projections": ("q", "k", "v")},
    "generated_q": {"static_projections": ()},
    "no_weight_decay": {"weight_decay": False},
    "no_weight_decay_no_dgd": {"weight_decay": False, "dgd": False},
    "mix_input": {"mix_input": True},
}


@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize(("other_chunk", "memory_chunk", "t"), [(1, 1, 7), (3, 3, 10), (3, 4, 11)])
def test_ablations_fast_path_equals_reference(ablation: str, other_chunk: int, memory_chunk: int,
                                              t: int) -> None:
    layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk, **ABLATIONS[ablation])
    x = inputs(t)
    y, _ = layer(x)
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ablation", ["static_k", "generated_q", "no_weight_decay", "mix_input"])
def test_ablations_stream_and_differentiate_like_the_reference(ablation: str) -> None:
    layer = make_layer(other_chunk_size=3, memory_chunk_size=3, **ABLATIONS[ablation])
    x = inputs(10).requires_grad_()
    y, state = layer(x)
    parts, split_state = [], None
    for a, b in ((0, 2), (2, 7), (7, 10)):
        out, split_state = layer(x[:, a:b], split_state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-9, atol=1e-10)
    assert split_state is not None
    assert_states_close(split_state, state)
    assert_outer_grads_match_reference(layer, x, y)


@pytest.mark.parametrize("mix", [False, True])
def test_with_mixed_inputs_a_heads_memories_read_the_whole_token(mix: bool) -> None:
    """Head 0's memory inputs change with head 1's slice of x_t iff ``mix_input``."""
    layer = make_layer(mix_input=mix)
    c = layer.config
    x = inputs(5)
    moved = x.clone()
    moved[..., c.head_dim:2 * c.head_dim] += 1.0  # head 1's slice only
    cache = layer.initial_state(x.shape[0]).conv_cache
    head0, head0_moved = (layer.project(v, cache)[0][:, 0] for v in (x, moved))
    assert (head0 - head0_moved).abs().max() > 1e-3 if mix else torch.equal(head0, head0_moved)


def test_input_mixing_starts_as_the_identity() -> None:
    """At initialisation ``mix_input`` changes nothing: the same outputs as without it."""
    torch.manual_seed(0)
    plain = SelfRefTitans(SelfRefTitansConfig(d_model=8, heads=2, head_dim=4, memory_chunk_size=3,
                                              other_chunk_size=3)).to(F64)
    mixed = SelfRefTitans(dataclasses.replace(plain.config, mix_input=True)).to(F64)
    assert mixed.to_x is not None
    mixed.load_state_dict({**plain.state_dict(), "to_x.weight": mixed.to_x.weight.detach()})
    x = inputs(7)
    torch.testing.assert_close(mixed(x)[0], plain(x)[0], rtol=0, atol=0)


def test_ablation_options_shape_the_layer() -> None:
    base = make_layer()
    assert base.generated == ("k", "v", "eta", "alpha") and base.to_k is None and base.to_q is not None
    static_k = make_layer(static_projections=("q", "k"))
    assert static_k.generated == ("v", "eta", "alpha") and static_k.to_k is not None
    assert static_k.other_init[0].shape[-3] == 3
    generated_q = make_layer(static_projections=())
    assert generated_q.generated == ("k", "v", "q", "eta", "alpha") and generated_q.to_q is None
    no_decay = make_layer(weight_decay=False)
    assert no_decay.generated == ("k", "v", "eta") and no_decay.readout_bias.shape[0] == 1
    with pytest.raises(ValueError, match="static_projections"):
        SelfRefTitansConfig(d_model=8, heads=2, head_dim=4, static_projections=("eta",))


@pytest.mark.parametrize(("other_chunk", "memory_chunk"), [(4, 4), (3, 4)])
def test_state_reports_the_inner_loop(other_chunk: int, memory_chunk: int) -> None:
    """η_t, β, forget rate, surprise and momentum norms of M_memory come back with the state;
    without momentum β and the momentum norm are exactly 0."""
    x = inputs(10)
    _, state = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk)(x)
    assert state.stats is not None
    stats = state.stats.as_dict()
    assert 0 < stats["theta"] < 0.6 and 0 < stats["eta"] < 1 and 0 < stats["alpha"] < 1
    assert stats["surprise_norm"] > 0 and stats["momentum_norm"] > 0
    layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk, momentum=False)
    _, state = layer(x)
    assert state.stats is not None
    assert state.stats.eta == 0 and state.stats.momentum_norm == 0


def test_chunk_size_changes_the_model() -> None:
    """Sanity check that the tests above compare something: C = 1 and C = 4 differ."""
    x = inputs(10)
    y1, _ = make_layer()(x)
    y4, _ = make_layer(other_chunk_size=4, memory_chunk_size=4)(x)
    assert (y1 - y4).abs().max() > 1e-3


@pytest.mark.parametrize("momentum", [True, False])
def test_one_call_equals_split_calls_and_token_by_token(momentum: bool) -> None:
    layer = make_layer(other_chunk_size=3, memory_chunk_size=4, momentum=momentum)
    x = inputs(13)
    y, state = layer(x)
    parts, split_state = [], None
    for a, b in ((0, 2), (2, 7), (7, 8), (8, 13)):
        out, split_state = layer(x[:, a:b], split_state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-9, atol=1e-10)
    tokens, step_state = [], None
    for i in range(13):
        out, step_state = layer(x[:, i:i + 1], step_state)
        tokens.append(out)
    torch.testing.assert_close(torch.cat(tokens, 1), y, rtol=1e-9, atol=1e-10)
    assert split_state is not None and step_state is not None
    assert_states_close(split_state, state)
    assert_states_close(step_state, state)
    assert state.other_buffer.shape[-2] == 13 % 3 and state.memory_buffer.length == 13 % 4


@pytest.mark.parametrize(("other_chunk", "memory_chunk", "t"), [(1, 1, 10), (3, 4, 10), (4, 4, 10), (4, 16, 7)])
def test_gradients_equal_reference(other_chunk: int, memory_chunk: int, t: int) -> None:
    """The outer gradient flows through the in-context updates into W_q, the convolution, the
    meta-learned initial memories, readouts, momenta and the output projection (tail chunks
    shorter than C; with chunk-start reads and T < C of M_memory the output reads only its
    initial state, so some parameters get no gradient in either path)."""
    for in_chunk_reads in (True, False):
        layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk,
                           in_chunk_reads=in_chunk_reads)
        x = inputs(t).requires_grad_()
        assert_outer_grads_match_reference(layer, x, layer(x)[0],
                                           allow_unused=not in_chunk_reads and t < memory_chunk)


def test_gradcheck_tiny() -> None:
    """Against finite differences, so without the step bound, whose κ the backward holds constant
    (the bounded layer's gradients are checked against the reference instead)."""
    layer = make_layer(d_model=4, heads=2, head_dim=2, other_chunk_size=2, memory_chunk_size=3,
                       step_bound=False)
    x = inputs(5, batch=1)[..., :4].requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: layer(inp)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda inp: layer(inp)[0], (x,))  # create_graph (meta-training)
    w = layer.memory_init[0]
    assert torch.autograd.gradcheck(
        lambda m0: torch.func.functional_call(layer, {"memory_init.0": m0}, (x.detach(),))[0], (w.detach().clone().requires_grad_(),))


def test_bf16_autocast_forward_and_backward() -> None:
    """Under autocast (``train.precision: bf16``) bf16 products meet fp32 weights; the DGD
    update runs in one dtype and the result stays close to full precision."""
    layer = make_layer(other_chunk_size=4, memory_chunk_size=4).float()
    x = inputs(10).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)[0]
    (g,) = torch.autograd.grad(y.float().square().sum(), x)
    y32 = layer(x)[0]
    (g32,) = torch.autograd.grad(y32.square().sum(), x)
    torch.testing.assert_close(y.float(), y32, rtol=0.1, atol=0.05)
    torch.testing.assert_close(g, g32, rtol=0.1, atol=0.1)


def test_dgd_single_step_is_the_literal_equation() -> None:
    """One token, linear memory M(x) = x + W x: W' = W (α I - η k kᵀ) - η ∇_W ||M(k) - v̂||²,
    with ∇ = 2 (k + W k - v̂) kᵀ (Eq. 88)."""
    spec = MemoryMLPSpec(5, depth=1, residual=True)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 5, 5, generator=gen, dtype=F64) / 3
    k = torch.nn.functional.normalize(torch.randn(1, 1, 5, generator=gen, dtype=F64), dim=-1)
    v_hat = torch.randn(1, 1, 5, generator=gen, dtype=F64)
    eta, alpha = torch.tensor([[0.3]], dtype=F64), torch.tensor([[0.9]], dtype=F64)
    new = dgd_chunk_update(GroupState(MemoryWeights((w,)), None), l2_loss_grads((w,), k, v_hat, spec),
                           eta, alpha.log(), None, dgd=True)
    kc, vc = k[0].T, v_hat[0].T  # column vectors
    grad = 2 * (kc + w[0] @ kc - vc) @ kc.T
    expected = w[0] @ (0.9 * torch.eye(5, dtype=F64) - 0.3 * kc @ kc.T) - 0.3 * grad
    torch.testing.assert_close(new.weights.layers[0][0], expected)


def literal_chunk_update(w0: MemoryWeights, s0: MemoryWeights | None, grads: RankOneGrads, eta: Tensor,
                         alpha: Tensor, beta: Tensor, dgd: bool) -> list[Tensor]:
    """The token-by-token recurrence with the chunk-start gradients, plain autograd ops, with
    the layer's step η' = η / max(1, ||z||²): S ← β S - η' δ ⊗ z, W ← W (α I - η' z zᵀ) + S (DGD)
    or α W + S; returns [W_n, (S_n,)] per layer."""
    out = []
    for layer, (w, z_all, d_all) in enumerate(zip(w0.layers, grads.inputs, grads.deltas, strict=True)):
        s = s0.layers[layer] if s0 is not None else torch.zeros_like(w)
        for t in range(eta.shape[-1]):
            z, d = z_all[:, t, :, None], d_all[:, t, :, None]
            a = alpha[:, t, None, None]
            e = eta[:, t, None, None] / z.square().sum((-2, -1), keepdim=True).clamp(min=1)  # the layer's step
            s = (beta[:, None, None] * s if s0 is not None else 0) - e * d @ z.transpose(-1, -2)
            eye = torch.eye(w.shape[-1], dtype=w.dtype)
            w = w @ (a * eye - e * z @ z.transpose(-1, -2)) + s if dgd else a * w + s
        out += [w, s] if s0 is not None else [w]
    return out


def chunk_update_inputs(n: int, momentum: bool, seed: int = 3) -> tuple[MemoryWeights, MemoryWeights | None,
                                                                        RankOneGrads, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 4), (4, 7)]

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    w0 = MemoryWeights(tuple(rand(2, o, i) / 2 for o, i in shapes))
    s0 = MemoryWeights(tuple(rand(2, o, i) / 4 for o, i in shapes)) if momentum else None
    grads = RankOneGrads(tuple(rand(2, n, o) for o, _ in shapes), tuple(rand(2, n, i) / 2 for _, i in shapes))
    eta, alpha = 0.4 * torch.rand(2, n, generator=gen, dtype=F64), 0.5 + 0.5 * torch.rand(2, n, generator=gen, dtype=F64)
    return w0, s0, grads, eta, alpha, torch.rand(2, generator=gen, dtype=F64)


def chunk_update_outputs(w0: MemoryWeights, s0: MemoryWeights | None, grads: RankOneGrads, eta: Tensor,
                         alpha: Tensor, beta: Tensor, dgd: bool) -> list[Tensor]:
    n = eta.shape[-1]
    new = dgd_chunk_update(GroupState(w0, s0), grads, eta, alpha.log(), beta.log()[:, None].expand(2, n), dgd)
    assert (new.momentum is None) == (s0 is None)
    out = []
    for layer, w in enumerate(new.weights.layers):
        out += [w, new.momentum.layers[layer]] if new.momentum is not None else [w]
    return out


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("dgd", [True, False])
def test_chunk_update_equals_literal_recurrence(momentum: bool, dgd: bool) -> None:
    """``dgd_chunk_update`` over n tokens == the token-by-token recurrence with the same
    (chunk-start) gradients."""
    args = chunk_update_inputs(6, momentum)
    for fast, literal in zip(chunk_update_outputs(*args, dgd), literal_chunk_update(*args, dgd), strict=True):
        torch.testing.assert_close(fast, literal)


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("n", [1, 6])
def test_chunk_update_gradients_equal_literal_recurrence(momentum: bool, n: int) -> None:
    """The hand-written backward of the DGD update (``DgdLayer``) == autograd through the
    literal recurrence, for every input: weights, δ, z, η, α and momenta, β."""
    w0, s0, grads, eta, alpha, beta = chunk_update_inputs(n, momentum, seed=n)
    leaves = [*w0.layers, *grads.deltas, *grads.inputs, eta, alpha, *((*s0.layers, beta) if s0 is not None else ())]
    for leaf in leaves:
        leaf.requires_grad_()
    weights = [torch.randn_like(w, dtype=F64) for w in literal_chunk_update(w0, s0, grads, eta, alpha, beta, True)]

    def total_grads(outs: list[Tensor]) -> tuple[Tensor, ...]:
        return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights, strict=True)), leaves)

    fast = total_grads(chunk_update_outputs(w0, s0, grads, eta, alpha, beta, True))
    literal = total_grads(literal_chunk_update(w0, s0, grads, eta, alpha, beta, True))
    for g_fast, g_literal in zip(fast, literal, strict=True):
        torch.testing.assert_close(g_fast, g_literal, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("momentum", [True, False])
def test_dgd_layer_gradcheck(momentum: bool, kernel: bool) -> None:
    """gradcheck and gradgradcheck of ``DgdLayer`` on arbitrary (not only chunk-shaped)
    coefficients, with z and the DGD system shared over a broadcast memory axis as in layer 1;
    with ``kernel`` its solves (forward and backward) run in ``cpu_kernels``."""
    gen = torch.Generator().manual_seed(0)
    m, n, o, i = 2, 3, 2, 3

    def rand(*shape: int) -> Tensor:
        return (0.5 * torch.randn(*shape, generator=gen, dtype=F64)).requires_grad_()

    args = [rand(m, o, i), rand(m, o, i) if momentum else None, rand(m, n, o), rand(1, n, i), rand(m, n, o),
            rand(m, 1, 1), rand(m, n, 1), rand(m, n, n), rand(m, n, 1), rand(1, n, n), rand(1, n, 1),
            *((rand(m, n, 1), rand(m, 1, 1), rand(m, 1, 1), rand(m, n, 1)) if momentum else (None,) * 4)]

    def fn(*xs: Tensor | None) -> tuple[Tensor, ...]:
        return tuple(t for t in DgdLayer.apply(kernel, *xs) if t is not None)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def recall_batch(batch: int, pairs: int, dim: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``pairs`` writes x = [key; value] then the same keys as queries x = [key; 0]; returns
    the sequence, the values and the shuffled order of the queries."""
    keys = torch.nn.functional.normalize(torch.randn(batch, pairs, dim, generator=gen), dim=-1)
    values = torch.nn.functional.normalize(torch.randn(batch, pairs, dim, generator=gen), dim=-1)
    order = torch.stack([torch.randperm(pairs, generator=gen) for _ in range(batch)])
    writes = torch.cat([keys, values], -1)
    queries = torch.cat([keys.gather(1, order[..., None].expand(-1, -1, dim)), torch.zeros_like(keys)], -1)
    return torch.cat([writes, queries], 1), values, order


def test_learns_in_context_recall() -> None:
    """Trained from scratch (outer loop over the meta-learned initial memories, W_q, readouts,
    ...) on random key/value pairs, the layer recalls the value of a queried key far better
    than chance; the recall goes through the in-context memory updates."""
    pairs, dim = 4, 8
    torch.manual_seed(0)
    layer = SelfRefTitans(SelfRefTitansConfig(d_model=2 * dim, heads=1, head_dim=2 * dim, expansion=1.0,
                                              memory_chunk_size=pairs, other_chunk_size=pairs,
                                              conv_kernel=0, eta_max=1.0))
    with torch.no_grad():
        layer.readout_bias[0].fill_(-2.0)  # η ≈ 0.12 to start with
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(0)

    def accuracy_and_loss(x: Tensor, values: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        recalled = layer(x)[0][:, pairs:, dim:]
        wanted = values.gather(1, order[..., None].expand(-1, -1, dim))
        scores = recalled @ values.transpose(1, 2)  # against every value of the sequence
        return (scores.argmax(-1) == order).double().mean(), (recalled - wanted).square().sum(-1).mean()

    for _ in range(120):
        _, loss = accuracy_and_loss(*recall_batch(32, pairs, dim, gen))
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    test = recall_batch(256, pairs, dim, gen)
    with torch.no_grad():
        acc, loss = accuracy_and_loss(*test)
        layer.readout_bias[0].fill_(-40.0)  # η_t ≈ 0: no in-context writes
        frozen_acc, _ = accuracy_and_loss(*test)
    assert loss < 0.6, float(loss)  # predicting 0 gives 1
    assert acc > 2.4 / pairs, float(acc)  # chance is 1 / pairs
    assert frozen_acc < 1.6 / pairs, float(frozen_acc)


def compiled_twin(layer: SelfRefTitans, **overrides: object) -> SelfRefTitans:
    """The same layer (config and weights) with ``compile=True`` and any config ``overrides``."""
    twin = SelfRefTitans(dataclasses.replace(layer.config, compile=True, **overrides)).to(F64)  # type: ignore[arg-type]
    twin.load_state_dict(layer.state_dict())
    return twin


@pytest.mark.parametrize("in_chunk_reads", [False, True])
def test_compiled_chunk_step_equals_eager(in_chunk_reads: bool) -> None:
    """``compile=True`` (torch.compile of each full aligned chunk) gives the eager path's
    outputs, states and outer gradients, in one call (with a tail) and split across calls.
    float64 on tiny shapes; inductor reassociates sums, hence 1e-9 and not bit equality."""
    eager = make_layer(other_chunk_size=4, memory_chunk_size=4, in_chunk_reads=in_chunk_reads)
    compiled = compiled_twin(eager)
    x = inputs(14).requires_grad_()
    y, state = eager(x)
    self_ref.compiled_chunk.cache_clear()
    with profile() as prof:
        y_c, state_c = compiled(x)
    assert self_ref.compiled_chunk.cache_info().currsize == 1  # the compiled step did run
    assert any(e.key == "nestlearn::batched_matmul" for e in prof.key_averages())  # its products too
    torch.testing.assert_close(y_c, y, rtol=1e-9, atol=1e-10)
    assert_states_close(state_c, state)
    grads = torch.autograd.grad(y.square().sum(), [x, *eager.parameters()])
    grads_c = torch.autograd.grad(y_c.square().sum(), [x, *compiled.parameters()])
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-9, atol=1e-10)
    first, mid = compiled(x[:, :6])
    rest, end = compiled(x[:, 6:], mid)
    torch.testing.assert_close(torch.cat([first, rest], 1), y, rtol=1e-9, atol=1e-10)
    assert_states_close(end, state)


@pytest.mark.parametrize("in_chunk_reads", [False, True])
def test_layer_with_the_kernels_equals_torch(in_chunk_reads: bool) -> None:
    """``compile=True`` on the general path (unequal chunk sizes: eager, no torch.compile) solves
    its DGD systems and makes the DGD update's products with the kernels: the same outputs,
    first and second derivatives as with torch's solves and products, in float64."""
    plain = make_layer(other_chunk_size=4, memory_chunk_size=2, in_chunk_reads=in_chunk_reads)
    kernel = compiled_twin(plain)
    x = inputs(11).requires_grad_()
    y = plain(x)[0]
    with profile() as prof:
        y_k = kernel(x)[0]
    assert {"nestlearn::unit_triangular_solve", "nestlearn::batched_matmul"} <= {e.key for e in prof.key_averages()}
    torch.testing.assert_close(y_k, y, rtol=1e-12, atol=1e-12)
    params = [x, *plain.parameters()]
    grads = torch.autograd.grad(y.square().sum(), params, create_graph=True)
    grads_k = torch.autograd.grad(y_k.square().sum(), [x, *kernel.parameters()], create_graph=True)
    for g, g_k in zip(grads, grads_k, strict=True):
        torch.testing.assert_close(g_k, g, rtol=1e-12, atol=1e-12)
    second = torch.autograd.grad(grads[0].square().sum(), plain.memory_init[0])[0]
    second_k = torch.autograd.grad(grads_k[0].square().sum(), kernel.memory_init[0])[0]
    torch.testing.assert_close(second_k, second, rtol=1e-10, atol=1e-12)


def saved_bytes(layer: SelfRefTitans, x: Tensor) -> tuple[Tensor, int]:
    """The layer's output on x and the bytes its graph saves for backward."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = layer(x)
    return y, total


def test_activation_budget_recomputes_instead_of_saving() -> None:
    """``activation_budget`` < 1 makes the compiled chunk keep fewer activations for backward
    (the partitioner recomputes the rest), with the same outputs and gradients. One complete
    chunk (compiled) and a tail (eager, reading its end state): each compiled variant costs
    about a minute of C++ compilation on a cold cache."""
    eager = make_layer(other_chunk_size=4, memory_chunk_size=4)
    full = compiled_twin(eager)
    lean = compiled_twin(eager, activation_budget=0.05)
    x = inputs(6).requires_grad_()
    y = eager(x)[0]
    grads = torch.autograd.grad(y.square().sum(), [x, *eager.parameters()])
    y_full, kept_full = saved_bytes(full, x)
    y_lean, kept_lean = saved_bytes(lean, x)
    assert kept_lean < 0.7 * kept_full, (kept_lean, kept_full)
    torch.testing.assert_close(y_lean, y, rtol=1e-9, atol=1e-10)
    grads_lean = torch.autograd.grad(y_lean.square().sum(), [x, *lean.parameters()])
    for g, g_l in zip(grads, grads_lean, strict=True):
        torch.testing.assert_close(g_l, g, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y_full, y, rtol=1e-9, atol=1e-10)


def test_deep_layer_steps_are_bounded_by_their_input_energy() -> None:
    """A deeper layer's input σ(W k) is not unit-norm: its step is η / max(1, ||z||²) in the fast
    path as in the reference (large initial memories put ||z||² well above 1 here), which makes
    every DGD decay a contraction, however large the input."""
    layer = make_layer(other_chunk_size=4, memory_chunk_size=4, init_scale=4.0, eta_max=1.0)
    k = torch.nn.functional.normalize(torch.randn(2, 2, 16, 4, dtype=F64), dim=-1)
    z2 = torch.nn.functional.silu(k @ layer.memory_init[0].transpose(-1, -2))
    assert z2.square().sum(-1).max() > 2  # the bound is active
    eta = torch.full(z2.shape[:-1], 0.5, dtype=F64)
    torch.testing.assert_close(layer_step(eta, k), eta)  # unit-norm k: η itself
    assert (layer_step(eta, z2) < eta).any()
    x = inputs(10).requires_grad_()
    torch.testing.assert_close(layer(x)[0], reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)

    # With no gradient, a chunk of DGD decays W Π (α I - η' z zᵀ) on inputs of norm 10 is a
    # contraction (its factors' eigenvalues are α and α - η'||z||² in [α - η, α]); with η
    # itself the factor along z would be 1 - 50.
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(1, 4, 6, generator=gen, dtype=F64)
    z_big = 10 * torch.nn.functional.normalize(torch.randn(1, 16, 6, generator=gen, dtype=F64), dim=-1)
    grads = RankOneGrads((torch.zeros(1, 16, 4, dtype=F64),), (z_big,))
    new = dgd_chunk_update(GroupState(MemoryWeights((w0,)), None), grads, torch.full((1, 16), 0.5, dtype=F64),
                           torch.full((1, 16), 0.99, dtype=F64).log(), None, dgd=True)
    assert torch.linalg.matrix_norm(new.weights.layers[0], ord=2) <= torch.linalg.matrix_norm(w0, ord=2)


def test_a_failed_compile_is_one_line_naming_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*_args: object) -> None:
        raise BackendCompilerFailed(None, OSError("cc1plus: not found\ndetails"), None)

    monkeypatch.setattr(self_ref, "compiled_chunk", lambda _config, _device: broken)
    compiled = compiled_twin(make_layer(other_chunk_size=4, memory_chunk_size=4))
    with pytest.raises(RuntimeError, match=r"^model\.self_ref\.compile=true: torch\.compile failed "
                                           r"\(OSError: cc1plus: not found\); set model\.self_ref\.compile=false") as err:
        compiled(inputs(8))
    assert "\n" not in str(err.value)


def test_chunk_step_scale_is_the_gershgorin_bound() -> None:
    """One token is never scaled (η' <= 0.5); n equal unit keys with steps s give κ = 1/(2 n s)."""
    z = F.normalize(torch.randn(3, 1, 4, dtype=F64, generator=torch.Generator().manual_seed(0)), dim=-1)
    # κ is 1 up to rounding at the boundary η' = 0.5: √η √η and ||z||² round either way
    # (bit-exact on some CPUs' sqrt and some draws only)
    torch.testing.assert_close(chunk_step_scale(torch.full((3, 1), 0.5, dtype=F64), z), torch.ones(3, 1, dtype=F64),
                               rtol=1e-14, atol=0)
    same = z.expand(3, 6, 4)
    torch.testing.assert_close(chunk_step_scale(torch.full((3, 6), 0.2, dtype=F64), same),
                               torch.full((3, 1), 1 / (2 * 6 * 0.2), dtype=F64))
    orthogonal = torch.eye(4, dtype=F64).expand(3, 4, 4)  # no shared direction: no pile-up
    torch.testing.assert_close(chunk_step_scale(torch.full((3, 4), 0.5, dtype=F64), orthogonal),
                               torch.ones(3, 1, dtype=F64), rtol=1e-14, atol=0)  # √0.5 √0.5 rounds up


def aligned_inputs(t: int, batch: int = 2, spread: float = 0.3) -> Tensor:
    """Tokens around one shared direction, as deep layers see on real text."""
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, generator=gen, dtype=F64) + spread * torch.randn(batch, t, 8, generator=gen, dtype=F64)


@pytest.mark.parametrize(("other_chunk", "memory_chunk", "t"), [(4, 4, 11), (3, 4, 10)])
def test_step_bound_equals_the_reference_where_it_acts(other_chunk: int, memory_chunk: int, t: int) -> None:
    """Large steps (η ≈ η_max) on inputs that share a direction: the bound acts (the unbounded
    layer gives other outputs), and the fast path equals the loop of definitions, values and
    gradients."""
    layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk)
    with torch.no_grad():
        layer.readout_bias[0].fill_(4.0)
    x = aligned_inputs(t).requires_grad_()
    y, _ = layer(x)
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)
    free = SelfRefTitans(dataclasses.replace(layer.config, step_bound=False)).to(F64)
    free.load_state_dict(layer.state_dict())
    assert (free(x)[0] - y).abs().max() > 1e-3
    assert_outer_grads_match_reference(layer, x, y)


def test_without_the_step_bound_the_chunk_form_overflows_where_the_per_token_one_does_not() -> None:
    layer = make_layer(other_chunk_size=8, memory_chunk_size=8, step_bound=False, v_norm=True)  # as hope
    with torch.no_grad():
        layer.readout_bias[0].fill_(6.0)  # η ≈ η_max, as 1% of a trained HOPE's tokens had
    x = aligned_inputs(256, batch=1, spread=0.1)
    with torch.no_grad():
        per_token = SelfRefTitans(dataclasses.replace(layer.config, other_chunk_size=1, memory_chunk_size=1)).to(F64)
        per_token.load_state_dict(layer.state_dict())
        bounded = SelfRefTitans(dataclasses.replace(layer.config, step_bound=True)).to(F64)
        bounded.load_state_dict(layer.state_dict())
        sizes = [float(m(x)[0].abs().max()) for m in (layer, per_token, bounded)]
    assert not math.isfinite(sizes[0]) or sizes[0] > 1e6, sizes
    assert sizes[1] < 100 and sizes[2] < 100, sizes


# In-chunk reads (``in_chunk_reads``): o_t = M_memory,t-1(q_t), earlier writes of the chunk visible.

@pytest.mark.parametrize(("other_chunk", "memory_chunk", "t"), [
    (1, 1, 7), (4, 4, 12), (3, 4, 10), (3, 5, 11), (5, 1, 10), (4, 16, 7)])
def test_in_chunk_reads_equal_the_per_token_reference(other_chunk: int, memory_chunk: int, t: int) -> None:
    """Per-token (C = 1), a divisor and non-divisors of T, unequal groups (general path) and
    T < C: outputs and outer gradients equal the loop that applies each token's update before
    the next token reads."""
    layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk, in_chunk_reads=True)
    x = inputs(t).requires_grad_()
    y, _ = layer(x)
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)
    assert_outer_grads_match_reference(layer, x, y)


def test_in_chunk_reads_see_the_chunks_writes_and_per_token_change_nothing() -> None:
    """At C = 1 the chunk-start memory is M_t-1: the switch changes nothing; at C = 4 it does."""
    x = inputs(11)
    for chunk, changes in ((1, False), (4, True)):
        on = make_layer(other_chunk_size=chunk, memory_chunk_size=chunk, in_chunk_reads=True)
        off = make_layer(other_chunk_size=chunk, memory_chunk_size=chunk, in_chunk_reads=False)
        with torch.no_grad():
            gap = float((on(x)[0] - off(x)[0]).abs().max())
        assert (gap > 1e-3) == changes, (chunk, gap)


@pytest.mark.parametrize("options", [{}, {"momentum": False}, {"dgd": False}, {"static_projections": ()},
                                     {"other_chunk_size": 4}])
def test_in_chunk_reads_stream_like_one_call(options: dict[str, object]) -> None:
    """Split calls and one token at a time give one call's outputs and states: a partial chunk's
    tokens read the writes buffered by earlier calls."""
    layer = make_layer(**{"other_chunk_size": 3, "memory_chunk_size": 4, "in_chunk_reads": True, **options})
    x = inputs(13)
    y, state = layer(x)
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)
    for bounds in (((0, 2), (2, 7), (7, 8), (8, 13)), tuple((i, i + 1) for i in range(13))):
        parts, split_state = [], None
        for a, b in bounds:
            out, split_state = layer(x[:, a:b], split_state)
            parts.append(out)
        torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-9, atol=1e-10)
        assert split_state is not None
        assert_states_close(split_state, state)


@pytest.mark.parametrize(("other_chunk", "memory_chunk", "t"), [(4, 4, 11), (3, 4, 10)])
def test_in_chunk_reads_with_the_step_bound_acting_are_causal_and_exact(other_chunk: int, memory_chunk: int,
                                                                       t: int) -> None:
    """Where κ < 1 (large steps on aligned inputs; v normalised, as in hope, since without it
    this input overflows even per token): values and gradients equal the reference, which reads
    through κ = 1 (the bound needs the whole chunk), and no output depends on a later input."""
    layer = make_layer(other_chunk_size=other_chunk, memory_chunk_size=memory_chunk, in_chunk_reads=True,
                       v_norm=True)
    with torch.no_grad():
        layer.readout_bias[0].fill_(4.0)
    x = aligned_inputs(t).requires_grad_()
    y, _ = layer(x)
    free = SelfRefTitans(dataclasses.replace(layer.config, step_bound=False)).to(F64)
    free.load_state_dict(layer.state_dict())
    assert (free(x)[0] - y).abs().max() > 1e-3  # the bound acts
    torch.testing.assert_close(y, reference_self_ref(layer, x), rtol=1e-9, atol=1e-10)
    assert_outer_grads_match_reference(layer, x, y)
    with torch.no_grad():  # changing the inputs after token i leaves y_0..y_i as they were
        for i in range(t - 1):
            changed = x.detach().clone()
            changed[:, i + 1:] = aligned_inputs(t - i - 1, spread=1.0)
            torch.testing.assert_close(layer(changed)[0][:, :i + 1], y[:, :i + 1], rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [
    dict(other_chunk_size=4, memory_chunk_size=4),
    dict(other_chunk_size=3, memory_chunk_size=5),
    dict(other_chunk_size=4, memory_chunk_size=4, in_chunk_reads=False),
    dict(other_chunk_size=4, memory_chunk_size=4, momentum=False, dgd=False),
    dict(other_chunk_size=4, memory_chunk_size=4, static_projections=(), curvature_step=False),
    dict(other_chunk_size=5, memory_chunk_size=5, weight_decay=False, static_projections=("q", "k")),
])
def test_one_token_decoding_equals_the_chunk_path(overrides: dict[str, object]) -> None:
    """Without autograd, a one-token call that completes no chunk advances the carried read
    copy (``dgd_token``) instead of re-running the chunk: token by token it gives the outputs
    and states of one call over the sequence, and of token-by-token calls with autograd on (the
    chunk path); it is taken wherever it applies."""
    layer = make_layer(**overrides)
    x = inputs(13)
    whole, whole_state = layer(x)
    taken = 0
    for prompt in (0, 6):  # token by token from the start, or after a prompt that ends mid-chunk
        with torch.no_grad():
            state, outs = None, []
            if prompt:
                y, state = layer(x[:, :prompt])
                outs.append(y)
            for t in range(prompt, 13):
                y, state = layer(x[:, t:t + 1], state)
                outs.append(y)
                taken += state.read is not None or (not layer.config.in_chunk_reads
                                                    and state.memory_buffer.length > 0)
        torch.testing.assert_close(torch.cat(outs, 1), whole.detach(), rtol=1e-9, atol=1e-10)
    assert state is not None
    assert_states_close(state, whole_state)
    chunk_path_state = None
    for t in range(13):
        _, chunk_path_state = layer(x[:, t:t + 1], chunk_path_state)
    assert chunk_path_state is not None and chunk_path_state.read is None  # autograd on: the chunk path
    assert_states_close(state, chunk_path_state)
    assert taken > 0
