"""The memory MLP: closed-form per-token gradients of ||M(k) - v||² equal autograd's."""

from __future__ import annotations

import pytest
import torch

from nestlearn.memory import (
    MemoryMLPSpec,
    MemoryWeights,
    autograd_loss_grad,
    l2_loss_grads,
    mlp_forward,
)
from nestlearn.memory.mlp import activation_derivative, activation_second_derivative

B, H, N, D = 2, 3, 5, 4


def random_weights(spec: MemoryMLPSpec, gen: torch.Generator) -> MemoryWeights:
    return MemoryWeights(tuple(torch.randn(B, H, o, i, generator=gen, dtype=torch.float64) * 1.5 / i**0.5
                               for o, i in spec.shapes()))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_activation_derivative(activation: str) -> None:
    u = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    spec = MemoryMLPSpec(2, activation=activation)  # type: ignore[arg-type]
    act = torch.nn.functional.silu(u) if spec.activation == "silu" else torch.nn.functional.gelu(u)
    (expected,) = torch.autograd.grad(act.sum(), u)
    torch.testing.assert_close(activation_derivative(u.detach(), spec.activation), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_activation_second_derivative(activation: str) -> None:
    u = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    spec = MemoryMLPSpec(2, activation=activation)  # type: ignore[arg-type]
    (expected,) = torch.autograd.grad(activation_derivative(u, spec.activation).sum(), u)
    torch.testing.assert_close(activation_second_derivative(u.detach(), spec.activation), expected,
                               rtol=1e-12, atol=1e-12)


def test_shapes() -> None:
    assert MemoryMLPSpec(4, depth=1).shapes() == [(4, 4)]
    assert MemoryMLPSpec(4, depth=3, expansion=2.0).shapes() == [(8, 4), (8, 8), (4, 8)]
    with pytest.raises(ValueError, match="activation"):
        MemoryMLPSpec(4, activation="relu")  # type: ignore[arg-type]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_closed_form_grads_match_autograd(depth: int, residual: bool, activation: str) -> None:
    gen = torch.Generator().manual_seed(depth * 10 + residual)
    spec = MemoryMLPSpec(D, depth, 2.0, activation, residual)  # type: ignore[arg-type]
    weights = random_weights(spec, gen)
    k = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    grads = l2_loss_grads(weights.layers, k, v, spec)
    for t in range(N):
        expected = autograd_loss_grad(weights, k[..., t:t + 1, :], v[..., t:t + 1, :], spec, False)
        for layer, (delta, z) in enumerate(zip(grads.deltas, grads.inputs, strict=True)):
            outer = delta[..., t, :, None] * z[..., t, None, :]
            torch.testing.assert_close(outer, expected.layers[layer], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(grads.sq_norm()[..., t], expected.sq_norm(), rtol=1e-11, atol=1e-12)


def test_loss_convention_has_no_half() -> None:
    """Linear memory: ∇_W ||W k - v||² = 2 (W k - v) kᵀ (Eq. 12 as written, factor 2 kept)."""
    spec = MemoryMLPSpec(D, depth=1)
    gen = torch.Generator().manual_seed(0)
    weights = random_weights(spec, gen)
    k = torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64)
    residual = mlp_forward(weights.layers, k, spec) - v
    expected = 2 * residual.transpose(-1, -2) @ k
    grads = l2_loss_grads(weights.layers, k, v, spec)
    torch.testing.assert_close(grads.deltas[0].transpose(-1, -2) @ grads.inputs[0], expected)


def test_residual_forward() -> None:
    spec = MemoryMLPSpec(D, depth=2, residual=True)
    weights = random_weights(spec, torch.Generator().manual_seed(1))
    x = torch.randn(B, H, N, D, dtype=torch.float64)
    plain = mlp_forward(weights.layers, x, MemoryMLPSpec(D, depth=2))
    torch.testing.assert_close(mlp_forward(weights.layers, x, spec), x + plain)
