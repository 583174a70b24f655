"""Per-token reference of the Titans memory (Titans Eq. 12-15, 16): obviously correct, slow.

One update per token, gradients by autograd. With ``chunk_size=1`` it is the exact recurrence
of Eq. 13 (gradient at M_{t-1}); with ``chunk_size=C`` every gradient of a chunk is taken at
that chunk's start state M_{t'} (Eq. 16, t' = t - mod(t, C)) but the momentum, decay and
retrieval still run token by token. The fast path (``chunked``) is tested against this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestlearn.memory.mlp import MemoryMLPSpec, mlp_forward
from nestlearn.memory.state import MemoryWeights, Writes


def autograd_loss_grad(weights: MemoryWeights, k: Tensor, v: Tensor, spec: MemoryMLPSpec,
                       create_graph: bool) -> MemoryWeights:
    """∇_W ||M_W(k) - v||² per (batch, head) by autograd; k, v ``(B, H, 1, d)``."""
    with torch.enable_grad():
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in weights.layers]
        loss = (mlp_forward(leaves, k, spec) - v).square().sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
    return MemoryWeights(tuple(grads))


def reference_memory_scan(weights: MemoryWeights, momentum: MemoryWeights, q: Tensor,
                          writes: Writes, spec: MemoryMLPSpec, chunk_size: int = 1,
                          grad_clip: float | None = None,
                          ) -> tuple[Tensor, MemoryWeights, MemoryWeights]:
    """y_t = M_t(q_t) for t = 1..T and the final (M_T, S_T).

    S_t = η_t S_{t-1} - θ_t clip(∇ℓ(M_{t'}; k_t, v_t)); M_t = (1 - α_t) M_{t-1} + S_t, with
    clip(g) = g · min(1, grad_clip / ||g||) over all layers of the (batch, head)'s memory.
    """
    create_graph = torch.is_grad_enabled()
    anchor = weights
    ys = []
    for t in range(writes.length):
        if t % chunk_size == 0:
            anchor = weights
        k, v = writes.k[..., t:t + 1, :], writes.v[..., t:t + 1, :]
        grad = autograd_loss_grad(anchor, k, v, spec, create_graph)
        theta = writes.theta[..., t, None, None]
        if grad_clip is not None:
            norm = grad.sq_norm().sqrt()[..., None, None]
            theta = theta * torch.clamp(grad_clip / norm, max=1.0)
        eta = writes.log_eta[..., t, None, None].exp()
        keep = writes.log_keep[..., t, None, None].exp()  # 1 - α_t
        momentum = MemoryWeights(tuple(eta * s - theta * g for s, g in zip(
            momentum.layers, grad.layers, strict=True)))
        weights = MemoryWeights(tuple(keep * w + s for w, s in zip(
            weights.layers, momentum.layers, strict=True)))
        ys.append(mlp_forward(weights.layers, q[..., t:t + 1, :], spec))
    y = torch.cat(ys, dim=-2) if ys else q
    return y, weights, momentum
