"""One token's update of the Titans memory inside a chunk: what decoding carries between chunk
boundaries instead of re-running the chunk's closed form for every new token.

Inside a chunk every gradient is taken at the chunk start M_0 (Eq. 16), and a token reads the
memory with the chunk's earlier tokens applied one at a time (Eq. 13):

    S_t = η_t S_t-1 - θ_t clip(∇ℓ(M_0; k_t, v_t)),    M_t = (1 - α_t) M_t-1 + S_t,

the paper's write, unbounded: the ``write_bound`` scales only the state a chunk hands on, which
a token completing the chunk still computes through the chunk path (``chunked``). The chunk
path resolves a token's read from the whole buffer (its cost grows with the position in the
chunk); carrying (M_t, S_t) makes a generated token cost one gradient of one token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestlearn.memory.chunked import clip_factors
from nestlearn.memory.mlp import MemoryMLPSpec, l2_loss_grads
from nestlearn.memory.state import MemoryWeights, Writes


def memory_token_step(anchor: MemoryWeights, weights: MemoryWeights, momentum: MemoryWeights, writes: Writes,
                      spec: MemoryMLPSpec, grad_clip: float | None,
                      ) -> tuple[MemoryWeights, MemoryWeights, Tensor]:
    """(M_t, S_t) from (M_t-1, S_t-1) = (``weights``, ``momentum``) for one token (``writes``
    of length 1), its gradient at ``anchor``, the chunk-start memory M_0; and ||g_t||²
    ``(B, H, 1)`` for the statistics."""
    grads = l2_loss_grads(anchor.layers, writes.k, writes.v, spec)
    sq = grads.sq_norm()
    step = (writes.theta * clip_factors(sq, grad_clip)).unsqueeze(-1)  # (B, H, 1, 1)
    eta, keep = writes.log_eta.exp().unsqueeze(-1), writes.log_keep.exp().unsqueeze(-1)
    new_s = tuple(eta * s - step * (d.mT @ z) for s, d, z in
                  zip(momentum.layers, grads.deltas, grads.inputs, strict=True))
    new_w = tuple(keep * w + s for w, s in zip(weights.layers, new_s, strict=True))
    return MemoryWeights(new_w), MemoryWeights(new_s), sq


def token_step_applies(x: Tensor, buffered: int, chunk_size: int, current_known: bool) -> bool:
    """Whether ``NeuralMemory`` can take ``memory_token_step`` for input x ``(B, T, D)``: one
    token, no autograd (training keeps the chunk path and its hand-written backward), completing
    no chunk, and (M_t-1, S_t-1) known (carried, or the chunk just began)."""
    return (x.shape[1] == 1 and not torch.is_grad_enabled() and buffered + 1 < chunk_size
            and (current_known or buffered == 0))
