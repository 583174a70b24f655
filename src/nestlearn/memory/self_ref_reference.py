"""Per-token reference of self-referential Titans (Nested Learning Eq. 83-88 and, with chunk
sizes > 1, Eq. 90): a readable loop, inner gradients by autograd, decays as explicit matrices.

For every token, in order: each group of memories takes its chunk-start snapshot (``anchor``)
when a chunk begins; k_t, v_t, η_t, α_t and o_t are read from the anchors; every memory makes
its target v̂ = M_anchor(v_t), takes ∇ℓ(M_anchor; k_t, v̂) by autograd (v̂ held fixed) and, layer
by layer with its input z at the anchor, applies literally

    η = η_t / max(1, ||z||²)                                  (the layer's step)
    S ← β S - η ∇ℓ                                           (S ≡ 0, β = 0 without momentum)
    W ← W (α_t I - η z zᵀ) + S        (DGD)     or     W ← α_t W + S      (``dgd=False``).

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


def dgd_token_step(weights: MemoryWeights, momentum: MemoryWeights | None, anchor: MemoryWeights,
                   k: Tensor, v_hat: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor | None,
                   spec: MemoryMLPSpec, dgd: bool) -> tuple[MemoryWeights, MemoryWeights | None]:
    """One token's update of a batch of memories; k, v̂ ``(..., 1, d)``, η, α, β broadcast to
    the weights' leading dims (``(...,)``)."""
    alias = anchor.map(lambda w: w.view_as(w))  # grad w.r.t. the weights, not through v̂
    grads = autograd_loss_grad(alias, k, v_hat, spec, create_graph=torch.is_grad_enabled())
    eta_, alpha_ = eta[..., None, None], alpha[..., None, None]
    new_w, new_s = [], []
    for layer, (w, g, z) in enumerate(zip(weights.layers, grads.layers,
                                          layer_inputs(anchor, k, spec), strict=True)):
        eta_l = eta_ / z.square().sum((-2, -1), keepdim=True).clamp(min=1.0)  # z: (..., 1, in)
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
    outputs = []
    for t in range(x.shape[1]):
        if t % c.other_chunk_size == 0:
            other_anchor = other
        if t % c.memory_chunk_size == 0:
            memory_anchor = memory
        x_t = xh[..., t:t + 1, :]
        writes = module.token_writes(mlp_forward(other_anchor.layers, x_t.unsqueeze(-3), spec), x_t)
        k, v = writes.k, writes.v
        eta, alpha = writes.eta[..., 0], writes.log_alpha[..., 0].exp()  # (B, H)
        q_t = q[..., t:t + 1, :] if q is not None else writes.q
        assert q_t is not None
        outputs.append(mlp_forward(memory_anchor.layers, q_t, spec))
        other, other_mom = dgd_token_step(
            other, other_mom, other_anchor, k.unsqueeze(-3),
            mlp_forward(other_anchor.layers, v.unsqueeze(-3), spec),
            eta.unsqueeze(-1), alpha.unsqueeze(-1), beta_other, spec, c.dgd)
        memory, memory_mom = dgd_token_step(
            memory, memory_mom, memory_anchor, k, mlp_forward(memory_anchor.layers, v, spec),
            eta, alpha, beta_memory, spec, c.dgd)
    return module.readout(torch.cat(outputs, dim=-2))
