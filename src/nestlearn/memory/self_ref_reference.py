"""Per-token reference of self-referential Titans (Nested Learning Eq. 83-88 and, with chunk
sizes > 1, Eq. 90): a readable loop, inner gradients by autograd, decays as explicit matrices.

For every token, in order: each group of memories takes its chunk-start snapshot (``anchor``)
when a chunk begins; k_t, v_t, η_t, α_t and o_t are read from the anchors; every memory makes
its target v̂ = M_anchor(v_t). When a chunk is complete, its tokens update the memories one at
a time, in order (reads use the anchors, so nothing reads them earlier): each takes
∇ℓ(M_anchor; k_t, v̂) by autograd (v̂ held fixed) and, layer by layer with its input z at the
anchor, applies literally

    η = κ η_t / max(1, g ||z||²)                              (the layer's step)
    S ← β S - η ∇ℓ                                           (S ≡ 0, β = 0 without momentum)
    W ← W (α_t I - η z zᵀ) + S        (DGD)     or     W ← α_t W + S      (``dgd=False``),

with g the layer's curvature gain at the anchor (``curvature_step``, ``dgd_chunk.curvature_gains``;
g = 1 without it), κ = 1, or with ``step_bound`` min(1, 1 / (2 λ̂)), λ̂ = max_j Σ_i √(η_i η_j)
|z̃_i·z̃_j|, z̃ = √g z, over the chunk's tokens (``dgd_chunk.chunk_step_scale``), written out as
loops.

With ``in_chunk_reads`` o_t reads instead the per-token weights M_memory,t-1: the chunk-start
memory with the chunk's earlier tokens applied one at a time by the same update, with κ = 1
(the bound depends on the whole chunk, so a read through it would see later tokens); the state
a complete chunk hands on is the bounded one above.

The fast path (``self_ref.SelfRefTitans.forward``) is tested against this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestlearn.memory.mlp import MemoryMLPSpec, activate, linear, mlp_forward
from nestlearn.memory.reference import autograd_loss_grad
from nestlearn.memory.self_ref import SelfRefTitans
from nestlearn.memory.state import MemoryWeights


def layer_inputs(weights: MemoryWeights, k: Tensor, spec: MemoryMLPSpec) -> list[Tensor]:
    """z^(l): the input of each layer when the memory reads k (z^(1) = k)."""
    inputs, a = [], k
    for w in weights.layers:
        inputs.append(a)
        a = activate(linear(w, a), spec.activation)
    return inputs


def token_grads(anchor: MemoryWeights, k: Tensor, v_hat: Tensor, spec: MemoryMLPSpec) -> MemoryWeights:
    """∇ℓ(M_anchor; k, v̂) by autograd, with v̂ held fixed (it was made from the same weights)."""
    # grad w.r.t. the weights, not through v̂: a view keeps the outer graph, detached without one
    alias = anchor.map(lambda w: w.view_as(w)) if torch.is_grad_enabled() else anchor.detach()
    return autograd_loss_grad(alias, k, v_hat, spec, create_graph=torch.is_grad_enabled())


def dgd_token_step(weights: MemoryWeights, momentum: MemoryWeights | None, anchor: MemoryWeights,
                   k: Tensor, v_hat: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor | None,
                   spec: MemoryMLPSpec, dgd: bool, scales: list[Tensor] | None = None,
                   curvature: bool = False) -> tuple[MemoryWeights, MemoryWeights | None]:
    """One token's update of a batch of memories; k, v̂ ``(..., 1, d)``, η, α, β broadcast to
    the weights' leading dims (``(...,)``); ``scales``: κ of each layer, as η; ``curvature``:
    each layer's energy ||z||² times its gain g at the anchor."""
    grads = token_grads(anchor, k, v_hat, spec)
    eta_, alpha_ = eta[..., None, None], alpha[..., None, None]
    new_w, new_s = [], []
    inputs = layer_inputs(anchor, k, spec)
    gains = gains_at(anchor, k, grads, spec, curvature)
    for layer, (w, g, z) in enumerate(zip(weights.layers, grads.layers, inputs, strict=True)):
        eta_l = eta_ / (z.square().sum((-2, -1), keepdim=True) * gains[layer]).clamp(min=1.0)  # z: (..., 1, in)
        if scales is not None:
            eta_l = eta_l * scales[layer][..., None, None]
        step = -eta_l * g
        if momentum is not None and beta is not None:
            step = beta[..., None, None] * momentum.layers[layer] + step
            new_s.append(step)
        if dgd:
            eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
            new_w.append(w @ (alpha_ * eye - eta_l * z.transpose(-1, -2) @ z) + step)
        else:
            new_w.append(alpha_ * w + step)
    return MemoryWeights(tuple(new_w)), None if momentum is None else MemoryWeights(tuple(new_s))


def gains_at(anchor: MemoryWeights, k: Tensor, grads: MemoryWeights, spec: MemoryMLPSpec, curvature: bool,
             ) -> list[Tensor]:
    """Each layer's curvature gain for one token (k ``(..., 1, d)``, its gradients ``grads`` at
    the anchor), by its definition: the change of M(k) when layer l alone moves along its
    gradient G (a Jacobian-vector product by autograd), ||J G z||² / (||G||² ||z||²) (0 where
    G = 0), shaped ``(..., 1, 1)``; ones without ``curvature`` and for the last layer."""
    one = torch.ones((), dtype=k.dtype, device=k.device)
    if not curvature:
        return [one] * len(anchor.layers)
    gains = []
    for layer, (g, z) in enumerate(zip(grads.layers, layer_inputs(anchor, k, spec), strict=True)):
        if layer == len(anchor.layers) - 1:
            gains.append(one)
            continue
        tangent = tuple(g if i == layer else torch.zeros_like(w) for i, w in enumerate(anchor.layers))
        primals = tuple(w.clone() for w in anchor.layers)  # dual tensors may not be broadcast views
        change = torch.func.jvp(lambda *ws: mlp_forward(ws, k, spec), primals, tangent)[1]
        size = g.square().sum((-2, -1), keepdim=True) * z.square().sum((-2, -1), keepdim=True)
        gains.append(change.square().sum((-2, -1), keepdim=True) / torch.where(size > 0, size, 1.0))
    return gains


def step_scales(anchor: MemoryWeights, tokens: list[tuple[Tensor, ...]], spec: MemoryMLPSpec,
                curvature: bool = False) -> list[Tensor]:
    """κ of each layer for a chunk's tokens (k, v̂, η, α), by the definition, pair by pair."""
    ks = [tok[0] for tok in tokens]
    etas = [tok[2] for tok in tokens]
    inputs = [layer_inputs(anchor, k, spec) for k in ks]
    gains = [gains_at(anchor, tok[0], token_grads(anchor, tok[0], tok[1], spec), spec, curvature) for tok in tokens]
    scales = []
    for layer in range(len(anchor.layers)):
        z = [zs[layer] * gs[layer].sqrt() for zs, gs in zip(inputs, gains, strict=True)]  # √g z, (..., 1, in)
        step = [e / zi.square().sum((-2, -1)).clamp(min=1.0) for e, zi in zip(etas, z, strict=True)]
        bound = torch.zeros_like(step[0])
        for j in range(len(tokens)):
            row = sum((step[i] * step[j]).sqrt() * (z[i] * z[j]).sum((-2, -1)).abs() for i in range(len(tokens)))
            bound = torch.maximum(bound, torch.as_tensor(row))
        scales.append(torch.where(2 * bound > 1, 1 / (2 * bound).clamp(min=1.0), torch.ones_like(bound)))
    return scales


def apply_chunk(weights: MemoryWeights, momentum: MemoryWeights | None, anchor: MemoryWeights,
                tokens: list[tuple[Tensor, ...]], beta: Tensor | None, spec: MemoryMLPSpec, dgd: bool,
                bounded: bool, curvature: bool) -> tuple[MemoryWeights, MemoryWeights | None]:
    """A complete chunk's tokens (k, v̂, η, α) applied one at a time, in order."""
    with torch.no_grad():
        scales = step_scales(anchor, tokens, spec, curvature) if bounded else None
    for k, v_hat, eta, alpha in tokens:
        weights, momentum = dgd_token_step(weights, momentum, anchor, k, v_hat, eta, alpha, beta, spec, dgd,
                                           scales, curvature)
    return weights, momentum


def reference_self_ref(module: SelfRefTitans, x: Tensor) -> Tensor:
    """The layer's output for x ``(B, T, D)`` from its initial state, one token at a time."""
    c, spec = module.config, module.config.spec()
    state = module.initial_state(x.shape[0])
    xh, q, _ = module.project(x, state.conv_cache)
    other, other_mom = state.other.weights, state.other.momentum
    memory, memory_mom = state.memory.weights, state.memory.momentum
    log_momentum = module.log_momentum()
    beta_other, beta_memory = (None, None) if log_momentum is None else (
        log_momentum[0].exp(), log_momentum[1].exp())
    other_anchor, memory_anchor = other, memory
    read, read_mom = memory, memory_mom  # M_memory,t-1 for in-chunk reads
    other_tokens: list[tuple[Tensor, ...]] = []
    memory_tokens: list[tuple[Tensor, ...]] = []
    outputs = []
    for t in range(x.shape[1]):
        if t % c.other_chunk_size == 0:
            other_anchor = other
        if t % c.memory_chunk_size == 0:
            memory_anchor = read = memory
            read_mom = memory_mom
        x_t = xh[..., t:t + 1, :]
        writes = module.token_writes(mlp_forward(other_anchor.layers, x_t.unsqueeze(-3), spec), x_t)
        k, v = writes.k, writes.v
        eta, alpha = writes.eta[..., 0], writes.log_alpha[..., 0].exp()  # (B, H)
        q_t = q[..., t:t + 1, :] if q is not None else writes.q
        assert q_t is not None
        outputs.append(mlp_forward((read if c.in_chunk_reads else memory_anchor).layers, q_t, spec))
        other_tokens.append((k.unsqueeze(-3), mlp_forward(other_anchor.layers, v.unsqueeze(-3), spec),
                             eta.unsqueeze(-1), alpha.unsqueeze(-1)))
        v_hat = mlp_forward(memory_anchor.layers, v, spec)
        memory_tokens.append((k, v_hat, eta, alpha))
        read, read_mom = dgd_token_step(read, read_mom, memory_anchor, k, v_hat, eta, alpha, beta_memory, spec, c.dgd,
                                        curvature=c.curvature_step)
        if (t + 1) % c.other_chunk_size == 0:
            other, other_mom = apply_chunk(other, other_mom, other_anchor, other_tokens, beta_other, spec,
                                           c.dgd, c.step_bound, c.curvature_step)
            other_tokens = []
        if (t + 1) % c.memory_chunk_size == 0:
            memory, memory_mom = apply_chunk(memory, memory_mom, memory_anchor, memory_tokens, beta_memory,
                                             spec, c.dgd, c.step_bound, c.curvature_step)
            memory_tokens = []
    return module.readout(torch.cat(outputs, dim=-2))
