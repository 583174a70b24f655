"""NestedExperienceMemory: experiences kept at three levels, routed by a learned importance gate.

The agents seed's memory of experiences, as levels of different size and update rate:

- **working**: the last `working_size` items, exact, read by softmax attention over their keys;
- **episodic**: up to `episodic_size` items the gate finds important enough, stored compressed (a
  learned projection of the key to `episodic_dim`) and read by attention in that space; when it
  is full, the least important item makes room;
- **semantic**: a linear associative memory M (value x key) that learns a pattern rather than
  storing items: each item the gate rates above `semantic_threshold` takes an exact proximal
  delta-rule step on 1/2 ||M k - v||^2 with a rate scaled by its importance (`dgd_proximal_update`,
  stable at any rate).

`retrieve(q)` mixes the three reads with learned weights (a softmax over three logits), so a
policy that uses it as context trains the mixture and the episodic projection through its own
loss. The gate is trained by `gate_loss` on whatever importance signal the user has (in a replay
buffer: the TD errors of replayed items, as prioritised replay uses them). Storage is not part of
autograd: writes happen under `no_grad`, reads are differentiable in the query and parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.optim.dgd import dgd_proximal_update

LEVELS = ("working", "episodic", "semantic")


class NestedExperienceMemory(nn.Module):
    """Items are (key, value) pairs of sizes `key_dim` and `value_dim` (e.g. an encoded state and
    what to recall with it: an action's return, the next state)."""

    working_keys: Tensor
    working_values: Tensor
    episodic_keys: Tensor
    episodic_values: Tensor
    episodic_importance: Tensor
    semantic: Tensor
    writes: Tensor

    def __init__(self, key_dim: int, value_dim: int, working_size: int = 64, episodic_size: int = 1024,
                 episodic_dim: int | None = None, gate_hidden: int = 32, episodic_threshold: float = 0.5,
                 semantic_threshold: float = 0.8, semantic_lr: float = 0.5) -> None:
        super().__init__()
        if min(key_dim, value_dim, working_size, episodic_size) < 1:
            raise ValueError(f"key_dim, value_dim, working_size and episodic_size must be >= 1 (got {key_dim}, "
                             f"{value_dim}, {working_size}, {episodic_size})")
        if not 0.0 <= episodic_threshold <= semantic_threshold <= 1.0:
            raise ValueError(f"thresholds (episodic {episodic_threshold}, semantic {semantic_threshold}) must "
                             "satisfy 0 <= episodic <= semantic <= 1")
        self.key_dim, self.value_dim = key_dim, value_dim
        self.episodic_threshold, self.semantic_threshold, self.semantic_lr = (
            episodic_threshold, semantic_threshold, semantic_lr)
        code = episodic_dim or max(1, key_dim // 2)
        self.gate = nn.Sequential(nn.Linear(key_dim + value_dim, gate_hidden), nn.Tanh(), nn.Linear(gate_hidden, 1))
        self.compress = nn.Linear(key_dim, code, bias=False)
        self.level_logits = nn.Parameter(torch.zeros(len(LEVELS)))
        self.register_buffer("working_keys", torch.zeros(working_size, key_dim))
        self.register_buffer("working_values", torch.zeros(working_size, value_dim))
        self.register_buffer("episodic_keys", torch.zeros(episodic_size, key_dim))
        self.register_buffer("episodic_values", torch.zeros(episodic_size, value_dim))
        self.register_buffer("episodic_importance", torch.full((episodic_size,), -1.0))  # -1: empty slot
        self.register_buffer("semantic", torch.zeros(value_dim, key_dim))
        self.register_buffer("writes", torch.zeros((), dtype=torch.long))

    def importance(self, keys: Tensor, values: Tensor) -> Tensor:
        """The gate's importance in (0, 1) of each item (N,)."""
        return torch.sigmoid(self.gate(torch.cat([keys, values], dim=-1))).squeeze(-1)

    def gate_loss(self, keys: Tensor, values: Tensor, targets: Tensor) -> Tensor:
        """Binary cross-entropy of the gate against target importances in [0, 1] (e.g. normalised
        |TD error| of replayed items)."""
        logits = self.gate(torch.cat([keys, values], dim=-1)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, targets)

    @torch.no_grad()
    def write(self, keys: Tensor, values: Tensor) -> dict[str, Tensor]:
        """Store items (N, key_dim), (N, value_dim): all in working memory, the important ones
        also in episodic memory, the most important also taught to the semantic memory. Returns
        each item's importance and the mask of the levels it went to."""
        scores = self.importance(keys, values)
        n, size = keys.shape[0], self.working_keys.shape[0]
        slots = (self.writes + torch.arange(n, device=keys.device)) % size
        self.working_keys[slots], self.working_values[slots] = keys, values  # later items win a slot
        self.writes += n
        episodic = scores >= self.episodic_threshold
        for i in torch.nonzero(episodic).flatten().tolist():
            slot = int(torch.argmin(self.episodic_importance))
            if float(self.episodic_importance[slot]) < float(scores[i]):
                self.episodic_keys[slot], self.episodic_values[slot] = keys[i], values[i]
                self.episodic_importance[slot] = scores[i]
        semantic = scores >= self.semantic_threshold
        for i in torch.nonzero(semantic).flatten().tolist():
            self.semantic.copy_(dgd_proximal_update(self.semantic, keys[i], -values[i],
                                                    self.semantic_lr * float(scores[i])))
        return {"importance": scores, "working": torch.ones_like(episodic), "episodic": episodic,
                "semantic": semantic}

    def level_reads(self, queries: Tensor) -> Tensor:
        """Each level's read of queries (N, key_dim): (N, 3, value_dim)."""
        filled = int(min(int(self.writes), self.working_keys.shape[0]))
        working = _attend(queries, self.working_keys[:filled], self.working_values[:filled])
        stored = self.episodic_importance >= 0
        episodic = _attend(self.compress(queries), self.compress(self.episodic_keys[stored]),
                           self.episodic_values[stored])
        semantic = queries @ self.semantic.mT
        return torch.stack([working, episodic, semantic], dim=1)

    def retrieve(self, queries: Tensor) -> Tensor:
        """The levels' reads mixed by the learned level weights: (N, value_dim)."""
        weights = torch.softmax(self.level_logits, dim=0)
        return torch.einsum("l,nlv->nv", weights, self.level_reads(queries))

    def level_weights(self) -> dict[str, float]:
        return dict(zip(LEVELS, torch.softmax(self.level_logits, dim=0).tolist(), strict=True))


def _attend(queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Softmax attention of queries over stored items; zeros from an empty store."""
    if keys.shape[0] == 0:
        return queries.new_zeros(queries.shape[0], values.shape[-1])
    scores = queries @ keys.mT / keys.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ values
