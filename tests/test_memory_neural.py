"""``NeuralMemory``: fast path == reference path (outputs and every parameter's gradient),
exact streaming, options, and in-context learning of key/value pairs."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory import (
    MemoryState,
    NeuralMemory,
    NeuralMemoryConfig,
    chunked,
    conv,
    neural_memory,
)
from nestlearn.memory.conv import causal_depthwise_conv

TINY = NeuralMemoryConfig(d_model=8, heads=2, head_dim=4, depth=2, expansion=2.0, chunk_size=4,
                          max_lr=0.5, grad_clip=1.0)


def build(cfg: NeuralMemoryConfig, seed: int = 0) -> NeuralMemory:
    torch.manual_seed(seed)
    return NeuralMemory(cfg).double()


def inputs(t: int, seed: int = 1, d_model: int = 8) -> Tensor:
    return torch.randn(2, t, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


VARIANTS = {
    "default": {},
    "depth1": {"depth": 1},
    "depth3_gelu_residual": {"depth": 3, "activation": "gelu", "residual": True},
    "no_momentum": {"momentum": False},
    "no_forgetting": {"forgetting": False},
    "plain": {"momentum": False, "forgetting": False, "conv_kernel": 0, "qk_norm": False,
              "output_gate": False, "grad_clip": None},
    "chunk1": {"chunk_size": 1},
    "chunk3": {"chunk_size": 3},
    "chunk8": {"chunk_size": 8},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [11, 3])
def test_forward_equals_reference(variant: str, length: int) -> None:
    memory = build(dataclasses.replace(TINY, **VARIANTS[variant]))
    x = inputs(length)
    y, state = memory(x)
    assert y.shape == x.shape
    assert state.position == length % memory.config.chunk_size
    torch.testing.assert_close(y, memory.forward_reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["default", "chunk3", "depth3_gelu_residual"])
def test_parameter_gradients_equal_reference(variant: str) -> None:
    memory = build(dataclasses.replace(TINY, **VARIANTS[variant]))
    x = inputs(10).requires_grad_()
    params = [x, *memory.parameters()]
    names = ["x"] + [n for n, _ in memory.named_parameters()]
    assert {"to_qkv.weight", "to_theta.weight", "to_eta.bias", "to_alpha.weight",
            "memory_init.0", "conv_weight"} <= set(names)
    probe = inputs(10, seed=5)
    fast = torch.autograd.grad((memory(x)[0] * probe).sum(), params)
    ref = torch.autograd.grad((memory.forward_reference(x) * probe).sum(), params)
    for name, a, b in zip(names, fast, ref, strict=True):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def _run_in_pieces(memory: NeuralMemory, x: Tensor, cuts: list[int]) -> tuple[Tensor, MemoryState]:
    state: MemoryState | None = None
    ys = []
    for start, end in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        y, state = memory(x[:, start:end], state)
        ys.append(y)
    assert state is not None
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("cuts", [[4, 8], [1, 2, 3, 9], [5, 6, 13], list(range(1, 14))],
                         ids=["chunk_aligned", "ragged", "mid_chunk", "token_by_token"])
def test_streaming_equals_one_call(cuts: list[int]) -> None:
    memory = build(TINY)
    x = inputs(14)
    y, state = memory(x)
    y_parts, state_parts = _run_in_pieces(memory, x, cuts)
    torch.testing.assert_close(y_parts, y, rtol=1e-12, atol=1e-12)
    assert state_parts.position == state.position == 2
    for a, b in zip(state_parts.weights.layers, state.weights.layers, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert state.conv_cache is not None and state_parts.conv_cache is not None
    torch.testing.assert_close(state_parts.conv_cache, state.conv_cache)


def test_decode_without_grad_and_detach() -> None:
    memory = build(TINY)
    x = inputs(9)
    y, _ = memory(x)
    state = None
    with torch.no_grad():
        for t in range(9):
            y_t, state = memory(x[:, t:t + 1], state)
            torch.testing.assert_close(y_t, y[:, t:t + 1].detach(), rtol=1e-12, atol=1e-12)
    _, state = memory(x)
    assert state.weights.layers[0].requires_grad
    assert not state.detach().weights.layers[0].requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt", [0, 2, 4])
def test_one_token_steps_equal_the_chunk_path(variant: str, prompt: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding after a prompt (none, ending mid-chunk, on a boundary): every token's output
    and the final state equal one call's, and only tokens completing a chunk take the chunk
    path (the others ``token_step``)."""
    memory = build(dataclasses.replace(TINY, **VARIANTS[variant]))
    x, length, size = inputs(13), 13, memory.config.chunk_size
    calls: list[int] = []
    scan = neural_memory.chunked_memory_scan

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return scan(*args, **kwargs)  # type: ignore[arg-type]

    with torch.no_grad():
        y, state = memory(x)
        ys, stepped = [y[:, :prompt]], memory(x[:, :prompt])[1] if prompt else None
        monkeypatch.setattr(neural_memory, "chunked_memory_scan", counted)
        for t in range(prompt, length):
            y_t, stepped = memory(x[:, t:t + 1], stepped)
            ys.append(y_t)
    assert stepped is not None
    torch.testing.assert_close(torch.cat(ys, dim=1), y, rtol=1e-10, atol=1e-12)
    assert len(calls) == sum((t + 1) % size == 0 for t in range(prompt, length))
    assert stepped.position == state.position == length % size
    pairs = [(stepped.weights, state.weights), (stepped.momentum, state.momentum)]
    if state.position:  # (M_t, S_t) after the buffered tokens, carried for the next token
        assert stepped.current is not None and state.current is not None
        pairs += zip(stepped.current, state.current, strict=True)
    else:
        assert stepped.current is None and state.current is None
    for a, b in pairs:
        for u, w in zip(a.layers, b.layers, strict=True):
            torch.testing.assert_close(u, w, rtol=1e-10, atol=1e-12)


def test_compiled_chunks_equal_eager() -> None:
    """``compile=True`` (each complete chunk's hand-written forward and backward through
    torch.compile) gives the eager outputs, state and gradients, in one call with a tail and
    across calls that cut chunks (those pieces run eagerly); a ``create_graph`` backward
    recomputes eagerly, so the second derivative is the eager one too. Inductor reassociates
    sums: 1e-9, not bit equality."""
    eager = build(TINY)
    compiled = build(dataclasses.replace(TINY, compile=True))
    compiled.load_state_dict(eager.state_dict())
    x = inputs(14).requires_grad_()
    probe = inputs(14, seed=5)
    chunked._compiled_steps.cache_clear()
    y_c, state_c = compiled(x)
    assert chunked._compiled_steps.cache_info().currsize == 1  # the compiled chunks did run
    y, state = eager(x)
    torch.testing.assert_close(y_c, y, rtol=1e-9, atol=1e-10)
    for a, b in zip(state_c.weights.layers + state_c.momentum.layers, state.weights.layers + state.momentum.layers,
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    params = [x, *eager.parameters()]
    grads = torch.autograd.grad((y * probe).sum(), params, create_graph=True)
    grads_c = torch.autograd.grad((y_c * probe).sum(), [x, *compiled.parameters()], create_graph=True)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-9, atol=1e-10)
    second = torch.autograd.grad(grads[0].square().sum(), eager.memory_init[0])[0]
    second_c = torch.autograd.grad(grads_c[0].square().sum(), compiled.memory_init[0])[0]
    assert second.abs().max() > 0
    torch.testing.assert_close(second_c, second, rtol=1e-9, atol=1e-10)
    y_parts, _ = _run_in_pieces(compiled, x, [6, 9])
    torch.testing.assert_close(y_parts, y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("piece", ["chunk", "conv"])
def test_a_failed_memory_compile_is_one_line_naming_the_option(monkeypatch: pytest.MonkeyPatch, piece: str) -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*_args: object) -> None:
        raise BackendCompilerFailed(None, OSError("cc1plus: not found\ndetails"), None)

    if piece == "chunk":
        monkeypatch.setattr(chunked, "_compiled_steps", lambda _spec, _clip, _bounded: (broken, broken))
    else:
        monkeypatch.setattr(conv, "_compiled", lambda: (broken, broken))
    memory = build(dataclasses.replace(TINY, compile=True))
    with pytest.raises(RuntimeError, match=r"^model\.titans\.memory_compile=true: torch\.compile failed "
                                           r"\(OSError: cc1plus: not found\); set model\.titans\.memory_compile=false"
                       ) as err:
        memory(inputs(8).requires_grad_())
    assert "\n" not in str(err.value)


def test_stats() -> None:
    memory = build(TINY)
    _, state = memory(inputs(7))
    assert state.stats is not None
    stats = state.stats.as_dict()
    assert set(stats) == {"theta", "eta", "alpha", "surprise_norm", "momentum_norm"}
    assert 0 < stats["theta"] < TINY.max_lr and 0 < stats["eta"] < 1 and 0 < stats["alpha"] < 1
    assert stats["surprise_norm"] > 0 and stats["momentum_norm"] > 0
    _, state = build(dataclasses.replace(TINY, momentum=False, forgetting=False))(inputs(7))
    assert state.stats is not None and state.stats.eta == 0 and state.stats.alpha == 0


@pytest.mark.parametrize(("field", "value"), [("heads", 0), ("chunk_size", 0), ("max_lr", 0.0),
                                              ("grad_clip", -1.0), ("init_scale", 0.0),
                                              ("activation", "tanh"), ("conv_kernel", -1)])
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "activation" else "activation"):
        dataclasses.replace(TINY, **{field: value})


def test_zero_init_allowed_for_linear_memory() -> None:
    memory = build(dataclasses.replace(TINY, depth=1, init_scale=0.0))
    assert all((w == 0).all() for w in memory.memory_init)


def _identity_memory(depth: int, max_lr: float, momentum: bool, dk: int, chunk: int) -> NeuralMemory:
    """x = [key | value | write flag]: q = k = key, v = value, θ ≈ max_lr on writes, ≈ 0 on reads."""
    cfg = NeuralMemoryConfig(d_model=2 * dk + 1, heads=1, head_dim=dk, depth=depth, expansion=2.0,
                             chunk_size=chunk, momentum=momentum, forgetting=False, conv_kernel=0,
                             output_gate=False, max_lr=max_lr)
    memory = build(cfg)
    eye = torch.eye(dk, dtype=torch.float64)
    with torch.no_grad():
        memory.to_qkv.weight.zero_()
        memory.to_qkv.weight[:dk, :dk] = eye
        memory.to_qkv.weight[dk:2 * dk, :dk] = eye
        memory.to_qkv.weight[2 * dk:, dk:2 * dk] = eye
        memory.to_theta.weight.zero_()
        memory.to_theta.weight[0, -1] = 40.0
        memory.to_theta.bias.fill_(-20.0)
        memory.to_out.weight.zero_()
        memory.to_out.weight[:dk, :dk] = eye
    return memory


@pytest.mark.parametrize(("depth", "max_lr", "momentum"), [(1, 0.3, False), (2, 0.05, True)])
def test_memory_learns_key_value_pairs_in_context(depth: int, max_lr: float, momentum: bool) -> None:
    """Write N pairs (one chunk), read them back, repeat: the recall error falls every pass."""
    dk, n, passes = 16, 8, 6
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(n, dk, generator=gen, dtype=torch.float64)
    values = torch.randn(n, dk, generator=gen, dtype=torch.float64)
    write = torch.cat([keys, values, torch.ones(n, 1, dtype=torch.float64)], -1)
    read = torch.cat([keys, torch.zeros(n, dk + 1, dtype=torch.float64)], -1)
    x = torch.cat([torch.cat([write[torch.randperm(n, generator=gen)], read]) for _ in range(passes)])
    memory = _identity_memory(depth, max_lr, momentum, dk, n)
    with torch.no_grad():
        y, _ = memory(x[None])
    target = F.silu(values)  # v_t = SiLU(x_t W_V) (§4.4)
    errors = [float((y[0, (2 * p + 1) * n:(2 * p + 2) * n, :dk] - target).square().sum()
                    / target.square().sum()) for p in range(passes)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.15 < errors[0], errors


def test_causal_depthwise_conv_equals_conv1d() -> None:
    gen = torch.Generator().manual_seed(3)
    padded = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 1, 4, generator=gen, dtype=torch.float64)
    expected = F.conv1d(padded.transpose(1, 2), weight, groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(padded, weight), expected, rtol=1e-12, atol=1e-12)


def test_causal_depthwise_conv_gradients() -> None:
    gen = torch.Generator().manual_seed(4)
    padded = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(causal_depthwise_conv, (padded, weight))
    assert torch.autograd.gradgradcheck(causal_depthwise_conv, (padded, weight))


def test_compiled_causal_depthwise_conv_equals_eager() -> None:
    """A ``compile_option`` fuses the shifted sums and their backward (one compile for any batch
    and length); outputs, gradients and, through the eager ``create_graph`` backward, second
    derivatives equal the eager ones."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for length in (9, 13):
        padded = torch.randn(2, length, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        probe = torch.randn(2, length - 3, 6, generator=gen, dtype=torch.float64)
        outs = {}
        for compiled in (False, True):
            y = causal_depthwise_conv(padded, weight, "compile" if compiled else None)
            g_padded, g_weight = torch.autograd.grad((y * probe).sum(), (padded, weight), create_graph=True)
            second = torch.autograd.grad(g_weight.square().sum(), padded)[0]
            outs[compiled] = (y, g_padded, g_weight, second)
        for a, b in zip(outs[True], outs[False], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    y = causal_depthwise_conv(padded, weight, "compile")  # a plain backward: the compiled one
    g_padded, g_weight = torch.autograd.grad((y * probe).sum(), (padded, weight))
    torch.testing.assert_close(g_padded, outs[False][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_weight, outs[False][2], rtol=1e-12, atol=1e-12)
