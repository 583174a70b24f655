"""NestedLRController: any torch optimizer, its learning rate set each step by a learned controller.

The agents seed's "NestedDQNOptimizer": a slow level (the `NestedController` that the nested
optimizer uses) watches training signals and scales each parameter group's learning rate within
[min_mult, max_mult]; the fast level is the wrapped optimizer. For reinforcement learning, whose
losses move with the data, the controller can also be given TD-error statistics (`observe`).

The controller is meta-trained on how much the loss improves, by the one-step hypergradient: the
step at multiplier m is m·d with d the base optimizer's step at multiplier 1 (exact for SGD, Adam
and AdamW, whose steps scale with the learning rate), so ∂L(θ_{t+1})/∂m_t = <g_{t+1}, d_t>. The
next step's gradients give that number for free; every `meta_every` updates the controller takes
one Adam step on Σ_t <g_{t+1}, d_t>·m_t (a gradient through m_t only). No extra forward or
backward pass is needed, so it works inside any training loop that calls `step()`
(stable-baselines3's included), with or without `observe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from nestlearn.optim.controller import N_FEATURES, NestedController, controller_features

LOSS_EMA = 0.9
TD_FEATURES = 2  # asinh of the TD errors' mean absolute value, log of their spread / 10


class NestedLRController(torch.optim.Optimizer):
    """Wrap `base` (an optimizer class, built over `params` with `lr` and `base_kwargs`).

    The param groups are the base optimizer's own: a schedule or a trainer that sets
    `group["lr"]` (stable-baselines3 does, every update) sets the base rate the multiplier scales.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 base: Callable[..., torch.optim.Optimizer] = torch.optim.Adam, base_kwargs: dict[str, Any] | None = None,
                 hidden_dim: int = 32, min_mult: float = 0.1, max_mult: float = 2.0, meta_every: int = 10,
                 meta_lr: float = 1e-2) -> None:
        if meta_every < 1:
            raise ValueError(f"meta_every={meta_every} is invalid; expected an integer >= 1")
        self.base = base(params, lr=lr, **(base_kwargs or {}))
        super().__init__(self.base.param_groups, self.base.defaults)  # the same group dicts
        self.state = self.base.state
        self.controller = NestedController(hidden_dim, min_mult, max_mult, n_features=N_FEATURES + TD_FEATURES)
        self.meta_optimizer = torch.optim.Adam(self.controller.parameters(), lr=meta_lr)
        self.meta_every = meta_every
        self.updates = 0
        self._loss: Tensor | None = None
        self._ema_loss: Tensor | None = None
        self._td = torch.zeros(TD_FEATURES)
        self._directions: list[list[Tensor]] | None = None  # d_t per group, per parameter
        self._mults: Tensor | None = None  # m_t, with the controller's graph
        self._meta_terms: list[Tensor] = []
        self.last_multipliers: list[float] = [1.0] * len(self.param_groups)

    def observe(self, loss: float | Tensor | None = None, td_errors: Tensor | None = None) -> None:
        """Signals for the next `step`: the training loss, and the TD errors of the batch (RL)."""
        if loss is not None:
            value = torch.as_tensor(float(loss), dtype=torch.float32)
            self._loss = value
            self._ema_loss = value if self._ema_loss is None else LOSS_EMA * self._ema_loss + (1 - LOSS_EMA) * value
        if td_errors is not None:
            td = td_errors.detach().float().abs()
            self._td = torch.stack([torch.asinh(td.mean()), torch.log(td.std(unbiased=False) + 1e-8) / 10.0])

    def _grads(self) -> list[list[Tensor | None]]:
        return [[p.grad for p in g["params"]] for g in self.param_groups]

    def _features(self, grads: list[list[Tensor | None]]) -> Tensor:
        sq = torch.stack([sum((g.detach().float().pow(2).sum() for g in group if g is not None), torch.zeros(()))
                          for group in grads])
        n = len(grads)
        base = controller_features(self._loss, self._ema_loss, sq, self.updates, torch.zeros(n), torch.zeros(n))
        return torch.cat([base, self._td.expand(n, TD_FEATURES)], dim=-1)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.observe(loss)
        grads = self._grads()
        if self._directions is not None and self._mults is not None:
            # ∂L(θ_t)/∂m_{t-1} = <g_t, d_{t-1}> per group: the last step's hypergradient
            hyper = torch.stack([sum((torch.sum(g.float() * d) for g, d in zip(gs, ds, strict=True) if g is not None),
                                     torch.zeros(())) for gs, ds in zip(grads, self._directions, strict=True)])
            with torch.enable_grad():
                self._meta_terms.append((hyper * self._mults).sum())
            if len(self._meta_terms) >= self.meta_every:
                self._meta_step()
        with torch.enable_grad():
            mults = self.controller(self._features(grads))
        self.last_multipliers = mults.tolist()
        before = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
        rates = [g["lr"] for g in self.param_groups]
        for group, rate, m in zip(self.param_groups, rates, self.last_multipliers, strict=True):
            group["lr"] = rate * m
        try:
            self.base.step()
        finally:
            for group, rate in zip(self.param_groups, rates, strict=True):
                group["lr"] = rate
        self._directions = [[(p.detach() - b).float() / max(m, 1e-12) for p, b in zip(g["params"], bs, strict=True)]
                            for g, bs, m in zip(self.param_groups, before, self.last_multipliers, strict=True)]
        self._mults = mults
        self.updates += 1
        return loss

    def _meta_step(self) -> None:
        """One Adam step of the controller on the summed hypergradient terms."""
        with torch.enable_grad():
            self.meta_optimizer.zero_grad(set_to_none=True)
            objective = torch.stack(self._meta_terms).sum()
            if math.isfinite(float(objective)):
                torch.autograd.backward(objective)
                self.meta_optimizer.step()
        self._meta_terms = []

    def effective_lrs(self) -> list[float]:
        """The learning rate each group took at the last step (base rate x multiplier)."""
        return [g["lr"] * m for g, m in zip(self.param_groups, self.last_multipliers, strict=True)]


NestedDQNOptimizer = NestedLRController  # the agents seed's name
