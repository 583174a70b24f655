"""The write bound of the Titans memory: the state a chunk hands on never steps past the
minimiser of the chunk's own loss along the chunk's write.

Why. Inside a chunk every gradient is taken at M_0 (Eq. 16) and the memory after the chunk's
n tokens holds the write -G, G = Σ_i w_i g_i, w_i = c_{n,i} θ_i (momentum and decay folded in,
``chunked``). That is one gradient step on the weighted loss L = Σ_i w_i ℓ_i. When the chunk's
keys point the same way (deep layers on real text: mean key cosine 0.6-0.8 within a chunk of
16), the n steps add up along one direction, the step overshoots, and the hidden activations
and the weights grow together until they overflow within a few hundred tokens.

The bound. Along -G, the Gauss-Newton model of L (ℓ_i = ||M(k_i) - v_i||², J_i the Jacobian of
M(k_i) in the weights) is L(M_0 - εG) ≈ L - ε||G||² + ε² Σ_i w_i ||J_i G||², minimised at
ε* = ||G||² / (2 Σ_i w_i ||J_i G||²). The state after the chunk takes κ G with κ = min(1, ε*):
the paper's write wherever it does not overshoot. For one token of a linear memory with a unit
key ε* = 1 / (2 θ), so with θ <= 0.5 the bound never acts there; it acts on a chunk of aligned
keys, where the n steps pile up. Reads inside the chunk keep the paper's write (bounding each
of them costs a tangent per pair of tokens, C³ per chunk, which tripled the layer's time at
C = 64); what compounds from chunk to chunk, the state, is bounded. κ uses the chunk's tokens
only (a partial chunk's state, e.g. ``current_memory``, is bounded on the tokens so far), and
the outer backward treats it as a constant, as it would a line search's step.

``write_scales`` is the closed form on the rank-one factors of the chunk (``chunked``);
``reference_write_scale`` the same number from autograd gradients and forward-mode JVPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nestlearn.memory.mlp import LossGradsTrace, MemoryMLPSpec, linear, mlp_forward
from nestlearn.memory.state import MemoryWeights


def _scale(sq_norm: Tensor, curvature: Tensor) -> Tensor:
    """min(1, ||G||² / (2 curvature)); 1 where there is nothing to bound (G = 0)."""
    over = 2 * curvature > sq_norm
    return torch.where(over, sq_norm / torch.where(over, 2 * curvature, 1.0), 1.0)


@torch.no_grad()
def write_scales(weights: Sequence[Tensor], trace: LossGradsTrace, w: Tensor, spec: MemoryMLPSpec) -> Tensor:
    """κ for each row of ``w`` ``(B, r, n)`` (a row: the weights w_i of the chunk's n tokens in
    one write); ``trace``: the chunk's gradient pass at M_0. Returns ``(B, r)``.

    With g_i = Σ_l δ^(l)_i ⊗ z^(l)_i and Grams K^(l) = Z^(l) Z^(l)ᵀ: ||G||² = Σ_l wᵀ
    (Δ^(l)Δ^(l)ᵀ ⊙ K^(l)) w, and J_j G is the forward-mode tangent of M(k_j) whose layer l
    adds G^(l) z^(l)_j = Σ_i w_i K^(l)_{j,i} δ^(l)_i.
    """
    deltas, inputs = trace.grads.deltas, trace.grads.inputs
    sq_norm = w.new_zeros(w.shape[:-1])
    tangent: Tensor | None = None
    for layer, (d, z) in enumerate(zip(deltas, inputs, strict=True)):
        gram = z @ z.mT
        sq_norm = sq_norm + ((w @ (d @ d.mT * gram)) * w).sum(-1)
        own = (w.unsqueeze(-2) * gram.unsqueeze(-3)) @ d.unsqueeze(-3)  # (B, r, n_j, out)
        if tangent is None:
            tangent = own
        else:
            slope = trace.slopes[layer - 1].unsqueeze(-3)
            tangent = linear(weights[layer].unsqueeze(-3), slope * tangent) + own
    assert tangent is not None
    curvature = (w * tangent.square().sum(-1)).sum(-1)
    return _scale(sq_norm, curvature)


@torch.no_grad()
def reference_write_scale(anchor: MemoryWeights, k: Tensor, write: MemoryWeights, w: Tensor,
                          spec: MemoryMLPSpec) -> Tensor:
    """κ of the state after a chunk's tokens so far, the slow way: ``write`` is -G (``(B, H, …)``
    per layer), ``k`` ``(B, H, n, d)`` the chunk's keys so far, ``w`` ``(B, H, n)`` their
    weights in it; J_j G by ``torch.func.jvp`` of M at ``anchor``."""
    sq_norm = write.sq_norm()
    curvature = torch.zeros_like(sq_norm)
    primals = tuple(w.clone() for w in anchor.layers)  # dual tensors may not be broadcast views
    for j in range(k.shape[-2]):
        def at(*layers: Tensor, j: int = j) -> Tensor:
            return mlp_forward(layers, k[..., j:j + 1, :], spec)

        tangent = torch.func.jvp(at, primals, tuple(d.clone() for d in write.layers))[1]
        curvature = curvature + w[..., j] * tangent.square().sum((-2, -1))
    return _scale(sq_norm, curvature)
