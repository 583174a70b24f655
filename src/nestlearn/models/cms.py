"""Continuum Memory System (CMS): MLP levels that each learn at their own frequency.

Nested Learning (Behrouz et al., arXiv 2512.24695 §7.1; NeurIPS version §3, Eqs. 30-31). A CMS
is a chain of MLP blocks MLP^(f_1) .. MLP^(f_k); level l owns parameters θ^(l) and a chunk
size C^(l) (its update period, the inverse of its frequency f_l):

    y_t = MLP^(f_k)(MLP^(f_{k-1})( ... MLP^(f_1)(x_t)))                          (Eq. 70 / 30)

    θ^(l)_{i+1} = θ^(l)_i - Σ_{t=i-C^(l)}^{i} η^(l)_t f(θ^(l)_t; x_t)   if i ≡ 0 (mod C^(l))
                = θ^(l)_i                                               otherwise    (Eq. 71 / 31)

where f is the error term of an optimizer (∇L for gradient descent). Here every level is a
pre-norm residual SwiGLU block, ``h <- h + SwiGLU_l(RMSNorm_l(h))``: the paper drops the norms
"for clarity" and uses residual MLPs for all its memories, and this choice makes one level
exactly the MLP sub-layer of a Transformer++ block, the case k = 1 the paper names.

Equation 71 is used on two clocks:

* **Training steps** (always available): `levels()` groups the parameters of the levels by
  chunk size, so `nestlearn.optim.level_clock.setup_optimizers` + `ChunkedUpdateScheduler`
  step level l once every C^(l) optimizer steps with its accumulated gradients.
* **Tokens, in context** (`cms.in_context`): the weights move at test time, once every C^(l)
  tokens, by -η^(l) times the task-loss gradient summed over the chunk. This module holds the
  per-context state and the update rule (`initial_state`, `effective_weights`, `step`); the
  language model that owns the task loss computes the gradients (`nestlearn.models.hope`).

How the levels' initial states are learned and wired is the CMS *form* (arXiv §7.1):

* ``sequential`` (Eq. 73): the chain above; every level's initial state θ^(l)_0 is a
  parameter learned by the outer loop (backpropagation through all in-context updates).
* ``nested`` (Eq. 72): the same chain, but the initial state of a level is itself learned in
  context by the next slower level, over that level's chunk, and the faster level is
  re-initialised to it whenever the slower level's chunk ends (after C^(s) / C^(s+1) of its own
  steps). We take the slower level's gradient step on that initial state Φ first-order: the
  meta-gradient ∂L/∂Φ is approximated by the sum of the faster level's gradients since its last
  reset (first-order MAML; with the two learning rates equal, Φ lands on the faster level's
  adapted weights, with a smaller slow rate it moves part of the way, as in Reptile). The
  slowest level's initial state is learned by the outer loop.
* ``independent`` (Eq. 74, "head-wise"): the levels read the same input side by side and are
  combined by a learned weighted sum, ``y = h + Σ_l a_l MLP^(f_l)(norm_l(h))`` (a_l = 1/k at
  initialisation); initial states are learned as in the sequential form.

Without in-context learning, ``nested`` and ``sequential`` compute the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from nestlearn.config.schema import CMSConfig
from nestlearn.models.layers import RMSNorm, SwiGLU
from nestlearn.utils.numerics import finite_rows_or_zero

# The weights of one level that learn in context: (gate_up, w_out) of its SwiGLU, either the
# learned (out, in) matrices or a batch of per-context copies (B, out, in).
LevelWeights = tuple[Tensor, Tensor]
_WEIGHT_NAMES = ("gate_up.weight", "w_out.weight")


class CMSLevel(nn.Module):
    """One level: MLP^(f_l)(RMSNorm(h)), a SwiGLU whose weights change every `chunk_size` steps."""

    def __init__(self, d_model: int, hidden: int, chunk_size: int, eps: float) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, hidden)

    def initial_weights(self) -> LevelWeights:
        """θ^(l)_0: the learned weights the in-context updates start from."""
        return self.mlp.gate_up.weight, self.mlp.w_out.weight

    def forward(self, h: Tensor, weights: LevelWeights | None = None) -> Tensor:
        """The level's output (B, T, d) for h (B, T, d), without the residual.

        `weights` (per-context (B, out, in) matrices) replace the learned ones; the SwiGLU
        itself is reused through `functional_call`, mapped over the batch.
        """
        x = self.norm(h)
        if weights is None:
            out: Tensor = self.mlp(x)
            return out

        def one(gate_up: Tensor, w_out: Tensor, xb: Tensor) -> Tensor:
            y: Tensor = functional_call(self.mlp, dict(zip(_WEIGHT_NAMES, (gate_up, w_out),
                                                           strict=True)), (xb,))
            return y

        mapped: Tensor = vmap(one)(weights[0], weights[1], x)
        return mapped


def _zeros(weights: LevelWeights, batch: int) -> LevelWeights:
    """Zeros of shape (batch, out, in) for a level's (out, in) weights."""
    gate_up, w_out = weights
    return (gate_up.new_zeros(batch, *gate_up.shape).detach(),
            w_out.new_zeros(batch, *w_out.shape).detach())


def _zeros_like(weights: LevelWeights) -> LevelWeights:
    return torch.zeros_like(weights[0]), torch.zeros_like(weights[1])


def _axpy(alpha: float, x: LevelWeights, y: LevelWeights) -> LevelWeights:
    """y + alpha * x, pairwise."""
    return y[0] + alpha * x[0], y[1] + alpha * x[1]


@dataclass(frozen=True)
class LevelState:
    """One level's in-context state for a batch of contexts; tensors are (B, out, in).

    ``delta``: θ^(l)_t - θ^(l)_0, the current weights as offsets from the learned initial ones.
    ``grad``: Σ ∇ℓ over the level's current chunk (Eq. 71's sum, applied when the chunk ends).
    ``init``: nested form only, Φ - θ^(l)_0, the reset point the next slower level learns.
    ``since_reset``: nested form only, Σ ∇ℓ since the last reset (first-order ∂L/∂Φ).
    """

    delta: LevelWeights
    grad: LevelWeights
    init: LevelWeights | None = None
    since_reset: LevelWeights | None = None


@dataclass(frozen=True)
class CMSState:
    """The in-context state of every level of one `ContinuumMemory`, in forward order."""

    levels: tuple[LevelState, ...]


def _slower_level(chunk_sizes: Sequence[int], level: int) -> int | None:
    """Index of the level with the next larger chunk size (the nested form's parent), if any."""
    slower = [j for j, c in enumerate(chunk_sizes) if c > chunk_sizes[level]]
    return min(slower, key=lambda j: chunk_sizes[j]) if slower else None


class ContinuumMemory(nn.Module):
    """The CMS of one block: ``forward(h (B, T, d), weights) -> (B, T, d)``, residual included.

    With k = 1 and no in-context weights this is exactly ``h + SwiGLU(RMSNorm(h))``, the MLP
    sub-layer of `TransformerPP`.
    """

    def __init__(self, d_model: int, hidden: int, cfg: CMSConfig, eps: float) -> None:
        super().__init__()
        self.form = cfg.form
        self.blocks = nn.ModuleList(CMSLevel(d_model, hidden, c, eps) for c in cfg.chunk_sizes)
        self.lrs = cfg.level_lrs()
        # Eq. 74's Agg: a learned weighted sum, 1/k each at initialisation.
        k = len(cfg.chunk_sizes)
        self.agg = (nn.Parameter(torch.full((k,), 1.0 / k)) if cfg.form == "independent"
                    else None)
        self.parents = [_slower_level(cfg.chunk_sizes, i) for i in range(k)]

    def level_modules(self) -> list[CMSLevel]:
        levels = []
        for block in self.blocks:
            assert isinstance(block, CMSLevel)
            levels.append(block)
        return levels

    def forward(self, h: Tensor, weights: Sequence[LevelWeights] | None = None) -> Tensor:
        """Eq. 70 (sequential, nested) or Eq. 74 (independent) on h, with the learned weights
        or, per level, the per-context `weights` of in-context learning."""
        levels = self.level_modules()
        per_level: Sequence[LevelWeights | None] = (
            [None] * len(levels) if weights is None else weights)
        if self.agg is not None:
            out = h
            for i, (level, w) in enumerate(zip(levels, per_level, strict=True)):
                out = out + self.agg[i] * level(h, w)
            return out
        for level, w in zip(levels, per_level, strict=True):
            h = h + level(h, w)
        return h

    # ---- in-context learning (Eq. 71 on the token clock) ----------------------------------

    def initial_state(self, batch: int) -> CMSState:
        """Every level at its learned initial state θ^(l)_0, nothing accumulated."""
        nested = self.form == "nested"
        states = []
        for level in self.level_modules():
            zeros = _zeros(level.initial_weights(), batch)
            states.append(LevelState(zeros, zeros, zeros if nested else None,
                                     zeros if nested else None))
        return CMSState(tuple(states))

    def effective_weights(self, state: CMSState, keep_graph: bool) -> list[LevelWeights]:
        """θ^(l)_t = θ^(l)_0 + delta per level, as tensors the task-loss gradient is taken for.

        With `keep_graph` they stay functions of θ_0 and of the earlier updates, so the outer
        loop meta-learns θ_0 through the in-context updates; otherwise they are fresh leaves.
        """
        weights = []
        for level, s in zip(self.level_modules(), state.levels, strict=True):
            pair = _axpy(1.0, s.delta, level.initial_weights())
            if not keep_graph:
                pair = (pair[0].detach(), pair[1].detach())
            for w in pair:
                if not w.requires_grad:  # a leaf: nothing upstream needs a gradient
                    w.requires_grad_(True)
            weights.append(pair)
        return weights

    def step(self, state: CMSState, grads: Sequence[LevelWeights], position: int) -> CMSState:
        """Add one segment's task-loss gradients and apply the updates due at `position`.

        `position` is the number of tokens seen so far (a multiple of every segment). Level l
        fires when position ≡ 0 (mod C^(l)): delta -= η^(l) * grad, grad = 0 (Eq. 71). In the
        nested form, when a level's parent fires, the parent moves the level's reset point by
        -η^(parent) * since_reset and the level restarts from it (Eq. 72, first order).
        """
        levels = self.level_modules()
        nested = self.form == "nested"
        updated: list[LevelState] = []
        for level, s, g, lr in zip(levels, state.levels, grads, self.lrs, strict=True):
            g = cast("LevelWeights", finite_rows_or_zero(*g))  # a bad segment teaches its sequence nothing
            acc = _axpy(1.0, g, s.grad)
            since = None if s.since_reset is None else _axpy(1.0, g, s.since_reset)
            delta = s.delta
            if position % level.chunk_size == 0:
                delta = _axpy(-lr, acc, delta)
                acc = _zeros_like(acc)
            updated.append(LevelState(delta, acc, s.init, since))
        if nested:
            for i, parent in enumerate(self.parents):
                if parent is None or position % levels[parent].chunk_size:
                    continue
                s = updated[i]
                assert s.init is not None and s.since_reset is not None
                init = _axpy(-self.lrs[parent], s.since_reset, s.init)
                updated[i] = LevelState(init, s.grad, init, _zeros_like(init))
        return CMSState(tuple(updated))
