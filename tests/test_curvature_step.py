"""The curvature-normalised step of the self-referential memories (``dgd_chunk.curvature_gains``,
``layer_step``): the gain is the Gauss-Newton curvature along the token's own gradient, and
with it a memory whose upper layer is large stays bounded where the input-energy step diverges."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nestlearn.memory.dgd_chunk import curvature_gains, layer_step
from nestlearn.memory.mlp import MemoryMLPSpec, activate, l2_loss_grads, linear, mlp_forward
from nestlearn.memory.self_ref_reference import dgd_token_step, layer_inputs
from nestlearn.memory.state import MemoryWeights

F64 = torch.float64


def random_weights(spec: MemoryMLPSpec, gen: torch.Generator) -> list[torch.Tensor]:
    dims = [spec.dim] + [spec.hidden] * (spec.depth - 1) + [spec.dim]
    return [torch.randn(2, o, i, dtype=F64, generator=gen) / math.sqrt(i) * 2 for i, o in itertools.pairwise(dims)]


def jacobian(weights: list[torch.Tensor], layer: int, u: torch.Tensor, spec: MemoryMLPSpec) -> torch.Tensor:
    """∂M/∂u^(layer) at the pre-activation u (one token, first batch row), by autograd."""
    def rest(pre: torch.Tensor) -> torch.Tensor:
        a = pre
        for w in weights[layer + 1:]:
            a = linear(w[0], activate(a, spec.activation))
        return a
    jac: torch.Tensor = torch.autograd.functional.jacobian(rest, u)
    return jac


@pytest.mark.parametrize("depth", [2, 3])
def test_gains_are_the_curvature_along_the_token_gradient(depth: int) -> None:
    """g^(l)_t = ||J δ||² / ||δ||² by autograd's Jacobian, at most ||J||₂² (none for the last layer)."""
    spec = MemoryMLPSpec(6, depth, 1.5, "silu", residual=True)
    gen = torch.Generator().manual_seed(depth)
    weights = random_weights(spec, gen)
    k = torch.randn(2, 5, 6, dtype=F64, generator=gen)
    v = torch.randn(2, 5, 6, dtype=F64, generator=gen)
    grads = l2_loss_grads(weights, k, v, spec)
    gains = curvature_gains(weights, grads, None, spec)
    assert gains[-1] is None  # the last layer: J = I
    inputs = layer_inputs(MemoryWeights(tuple(weights)), k, spec)
    for layer in range(depth - 1):
        gain = gains[layer]
        assert gain is not None and gain.shape == (2, 5)
        for t in range(5):
            jac = jacobian(weights, layer, linear(weights[layer][0], inputs[layer][0, t]), spec)
            delta = grads.deltas[layer][0, t]
            exact = float((jac @ delta).square().sum() / delta.square().sum())
            assert math.isclose(float(gain[0, t]), exact, rel_tol=1e-10)
            assert exact <= float(torch.linalg.matrix_norm(jac, ord=2)) ** 2 * (1 + 1e-12)


def test_layer_step_divides_by_the_gained_energy_above_one() -> None:
    eta = torch.tensor([0.1, 0.1, 0.1], dtype=F64)
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0]], dtype=F64)
    gain = torch.tensor([4.0, 1.0, 2.0], dtype=F64)
    torch.testing.assert_close(layer_step(eta, z, gain), torch.tensor([0.1 / 4, 0.1 / 4, 0.1], dtype=F64))
    torch.testing.assert_close(layer_step(eta, z), torch.tensor([0.1, 0.1 / 4, 0.1], dtype=F64))


def peak_weight(curvature: bool, seed: int, tokens: int = 400) -> float:
    """The per-token recurrence (momentum β = 0.5, η = 0.1, self-generated targets v̂ = M(v), v
    near k) of a residual 2-layer memory whose second layer has spectral norm 8: the largest
    |W| reached, inf once it overflows."""
    spec = MemoryMLPSpec(8, 2, 1.0, "silu", residual=True)
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(1, 8, 8, dtype=F64, generator=gen) / math.sqrt(8)
    w2 = torch.randn(1, 8, 8, dtype=F64, generator=gen)
    w2 = w2 / torch.linalg.matrix_norm(w2, ord=2)[..., None, None] * 8.0
    weights = MemoryWeights((w1, w2))
    momentum = MemoryWeights((torch.zeros_like(w1), torch.zeros_like(w2)))
    eta, alpha, beta = (torch.full((1,), x, dtype=F64) for x in (0.1, 0.999, 0.5))
    peak = 0.0
    for _ in range(tokens):
        k = torch.nn.functional.normalize(torch.randn(1, 1, 8, dtype=F64, generator=gen), dim=-1)
        noise = torch.nn.functional.normalize(torch.randn(1, 1, 8, dtype=F64, generator=gen), dim=-1)
        v = torch.nn.functional.normalize(k + 0.7 * noise, dim=-1)
        with torch.no_grad():
            v_hat = mlp_forward(weights.layers, v, spec)
        new_w, new_s = dgd_token_step(weights, momentum, weights, k, v_hat, eta, alpha, beta, spec, True,
                                      curvature=curvature)
        assert new_s is not None
        weights, momentum = new_w.detach(), new_s.detach()
        top = max(float(w.abs().max()) for w in weights.layers)
        if not math.isfinite(top) or top > 1e6:
            return math.inf
        peak = max(peak, top)
    return peak


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_curvature_step_keeps_a_memory_with_a_large_upper_layer_bounded(seed: int) -> None:
    """The failure a trained HOPE showed past its training length, in miniature: with the
    input-energy step the first layer's curvature is ~64x what its step assumes and the memory
    overflows; with the curvature step it stays within a few times its initial size (8)."""
    assert peak_weight(curvature=False, seed=seed) == math.inf
    assert peak_weight(curvature=True, seed=seed) < 16.0
