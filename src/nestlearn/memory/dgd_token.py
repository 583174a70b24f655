"""One token's DGD step on a memory whose gradients are taken at its chunk start: the running
read copy M_memory,t-1 that decoding carries between chunk boundaries.

Inside a chunk of Eq. 90 a token reads M_t-1 = the chunk-start memory with the chunk's earlier
tokens applied one at a time, each with its gradient at the chunk start (``dgd_chunk.read_chunk``
resolves all of them at once in closed form). Generation feeds one token per call; re-running
the chunk's closed form for each costs ~3,000 small torch calls per token, so decoding keeps
M_t-1 itself and advances it by this step instead (``SelfRefTitans`` uses it for a token that
does not complete a chunk). Per layer, with z, δ the layer's input and output gradient at the
chunk start (``mlp.l2_loss_grads``) and η' its step (``dgd_chunk.layer_step``, no chunk bound:
a read never sees the whole chunk):

    S ← β S - η' δ zᵀ,        W ← α W - η' (W z) zᵀ + S   (DGD)   or   W ← α W + S.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestlearn.memory.dgd_chunk import GroupState, curvature_gains, layer_step
from nestlearn.memory.mlp import MemoryMLPSpec, l2_loss_grads, mlp_forward
from nestlearn.memory.state import MemoryWeights


def read_step(read: GroupState, anchor: GroupState, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor,
              log_beta: Tensor | None, spec: MemoryMLPSpec, dgd: bool, curvature: bool) -> GroupState:
    """M_t from M_t-1 (``read``) for one token: k, v ``(B, H, 1, d)``, η_t, log α_t ``(B, H, 1)``,
    log β ``(H,)`` (``None`` without momentum); target v̂ and gradients from ``anchor`` (the
    chunk-start memory)."""
    layers = anchor.weights.layers
    grads = l2_loss_grads(layers, k, mlp_forward(layers, v, spec), spec)
    gains = curvature_gains(layers, grads, None, spec) if curvature else (None,) * len(layers)
    alpha = log_alpha.exp().unsqueeze(-1)  # (B, H, 1, 1)
    beta = None if log_beta is None else log_beta.exp()[:, None, None]  # (H, 1, 1)
    momenta = (None,) * len(layers) if read.momentum is None else read.momentum.layers
    new_w: list[Tensor] = []
    new_s: list[Tensor] = []
    for w, s, delta, z, gain in zip(read.weights.layers, momenta, grads.deltas, grads.inputs, gains, strict=True):
        step = layer_step(eta, z, gain).unsqueeze(-1)  # (B, H, 1, 1)
        write = -step * (delta.mT @ z)
        if s is not None and beta is not None:
            write = beta * s + write
            new_s.append(write)
        decay = alpha * w - step * (w @ z.mT) @ z if dgd else alpha * w
        new_w.append(decay + write)
    return GroupState(MemoryWeights(tuple(new_w)), MemoryWeights(tuple(new_s)) if new_s else None)


def decoding_applies(x: Tensor, other_buffered: int, memory_buffered: int, other_chunk: int, memory_chunk: int,
                     read_known: bool) -> bool:
    """Whether ``SelfRefTitans`` can take the one-token step for input x ``(B, T, D)``: one token,
    no autograd (training keeps the chunk path, whose backward is hand-written), completing no
    chunk of either group, and M_t-1 known (``read_known``: carried, or the chunk just began)."""
    completes = other_buffered + 1 >= other_chunk or memory_buffered + 1 >= memory_chunk
    return (x.shape[1] == 1 and not torch.is_grad_enabled() and not completes
            and (read_known or memory_buffered == 0))
