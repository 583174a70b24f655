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
from nestlearn.memory.write_bound import reference_write_scale


def autograd_loss_grad(weights: MemoryWeights, k: Tensor, v: Tensor, spec: MemoryMLPSpec,
                       create_graph: bool) -> MemoryWeights:
    """∇_W ||M_W(k) - v||² per (batch, head) by autograd; k, v ``(B, H, 1, d)``."""
    with torch.enable_grad():
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in weights.layers]
        loss = (mlp_forward(leaves, k, spec) - v).square().sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
    return MemoryWeights(tuple(grads))


def _combine(a: Tensor | float, x: MemoryWeights, b: Tensor | float, y: MemoryWeights) -> MemoryWeights:
    """a x + b y, layer by layer."""
    return MemoryWeights(tuple(a * u + b * w for u, w in zip(x.layers, y.layers, strict=True)))


def reference_memory_scan(weights: MemoryWeights, momentum: MemoryWeights, q: Tensor,
                          writes: Writes, spec: MemoryMLPSpec, chunk_size: int = 1,
                          grad_clip: float | None = None, bounded: bool = False,
                          ) -> tuple[Tensor, MemoryWeights, MemoryWeights]:
    """y_t = M_t(q_t) for t = 1..T and the final (M_T, S_T).

    S_t = η_t S_{t-1} - θ_t clip(∇ℓ(M_{t'}; k_t, v_t)); M_t = (1 - α_t) M_{t-1} + S_t, with
    clip(g) = g · min(1, grad_clip / ||g||) over all layers of the (batch, head)'s memory.
    The recurrence runs as two: the chunk-start memory carried on without writes (M', S'), and
    the chunk's write (D, U) from zero, so that M_t = M'_t + D_t, S_t = S'_t + U_t. ``bounded``:
    the state handed on after a chunk's last token (and the final state) is M'_t + κ_t D_t,
    S'_t + κ_t U_t with κ_t the ``write_bound`` (``reference_write_scale``); the weights of each
    token's gradient in D_t run through the same recurrence as scalars.
    """
    create_graph = torch.is_grad_enabled()
    ys = []
    anchor = weights
    carried, carried_s = weights, momentum
    zeros = weights.map(torch.zeros_like)
    write, write_s = zeros, zeros
    keys: list[Tensor] = []
    coef: list[Tensor] = []  # the weight of each of the chunk's gradients in D_t
    coef_s: list[Tensor] = []
    for t in range(writes.length):
        if t % chunk_size == 0:
            anchor, carried, carried_s = weights, weights, momentum
            write, write_s, keys, coef, coef_s = zeros, zeros, [], [], []
        k, v = writes.k[..., t:t + 1, :], writes.v[..., t:t + 1, :]
        grad = autograd_loss_grad(anchor, k, v, spec, create_graph)
        theta = writes.theta[..., t, None, None]
        if grad_clip is not None:
            norm = grad.sq_norm().sqrt()[..., None, None]
            theta = theta * torch.clamp(grad_clip / norm, max=1.0)
        eta = writes.log_eta[..., t, None, None].exp()
        keep = writes.log_keep[..., t, None, None].exp()  # 1 - α_t
        carried_s = _combine(eta, carried_s, 0.0, carried_s)
        carried = _combine(keep, carried, 1.0, carried_s)
        write_s = _combine(eta, write_s, -theta, grad)
        write = _combine(keep, write, 1.0, write_s)
        keys.append(k)
        coef_s = [eta[..., 0, 0] * c for c in coef_s] + [theta[..., 0, 0]]
        coef = [keep[..., 0, 0] * c + cs for c, cs in zip([*coef, torch.zeros_like(coef_s[-1])],
                                                          coef_s, strict=True)]
        ys.append(mlp_forward(_combine(1.0, carried, 1.0, write).layers, q[..., t:t + 1, :], spec))
        handed_on = (t + 1) % chunk_size == 0 or t + 1 == writes.length
        scale = (reference_write_scale(anchor, torch.cat(keys, -2), write, torch.stack(coef, -1), spec)
                 [..., None, None] if bounded and handed_on else 1.0)
        weights = _combine(1.0, carried, scale, write)
        momentum = _combine(1.0, carried_s, scale, write_s)
    y = torch.cat(ys, dim=-2) if ys else q
    return y, weights, momentum
