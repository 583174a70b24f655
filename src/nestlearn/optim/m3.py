"""M3, Multi-scale Momentum Muon: a fast and a slow (chunk-level) momentum, both orthogonalised."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nestlearn.optim.closure import evaluate_closure
from nestlearn.optim.momentum import Params
from nestlearn.optim.newton_schulz import adamw_fallback_step, newton_schulz


class M3(torch.optim.Optimizer):
    """Algorithm 1 of arXiv 2512.24695 (§7.2): the Continuum Memory System applied to momentum.

    Transcription followed (a LaTeX copy of Algorithm 1, cross-checked with two independent
    transcriptions and two implementations that cite it)::

        1  M1_0, M2_0 <- 0,  V_0 <- 0
        2  for lower-frequency iteration k = 0, 1, 2, ...
        3      M2 <- M2 + beta3 * sum_{i=(k-1)f}^{kf} g_i           (slow memory)
        4      O2 <- NewtonSchulz_T(M2)
        5      for t = kf+1, ..., (k+1)f
        6          g_t = grad L(Theta_t)
        7          M1 <- M1 + beta1 g_t                               (fast memory)
        8          V  <- V + beta2 g_t^2                              (second moment)
        9          O1 <- NewtonSchulz_T(M1)
        10         Theta_t <- Theta_{t-1} - eta (O1 + alpha O2) / sqrt(V + eps)

    Step t of this optimizer is line 6-10 with the O2 of its chunk; M2 and O2 change only after
    steps t = f, 2f, ... (line 3-4 of the next chunk), so within a chunk the slow term is constant.
    At k = 0 the sum is empty: O2 = 0 for the first f steps.

    Where sources differ or the text is ambiguous, the reading taken:
    * Line 3's sum runs over (k-1)f..kf, f + 1 indices, overlapping the previous chunk by one
      gradient; we sum the chunk's own f gradients g_{(k-1)f+1} .. g_{kf} (CMS, Eq. 31, sums a
      chunk once).
    * Line 10's denominator is ``sqrt(V + eps)`` in the LaTeX copy; other transcriptions print
      ``sqrt(V) + eps``. We follow the LaTeX (floor sqrt(eps)).
    * Lines 7-8 accumulate without decay, as printed (the betas are "momentum factors" but scale
      only). Consequence worth knowing: NS is scale-invariant, so beta1 and beta3 have no effect
      beyond the NS epsilon, and beta2 only trades off against eps; V grows like t, so the step
      shrinks like 1/sqrt(t) (AdaGrad-like) and the "fast" memory is the orthogonalised sum of all
      gradients so far. We implement the algorithm as printed.
    * Line 10 divides the orthogonalised matrix elementwise by sqrt(V + eps), as printed.

    Tensors of more than two dimensions are orthogonalised as (out x rest) matrices. Params of
    fewer than two dimensions, and every param of a group with ``orthogonalize=False`` (e.g.
    embeddings), take an AdamW step instead (``adam_betas``, ``adam_eps``, the group's lr), as in
    Muon; give them a group with an Adam-scale lr.

    Args:
        lr: eta.
        betas: (beta1, beta2, beta3) of lines 7, 8 and 3.
        alpha: weight of the slow momentum in line 10.
        eps: epsilon of line 10.
        frequency: f, the chunk length of the slow memory, in steps.
        ns_steps: T, Newton-Schulz iterations.
        weight_decay: decoupled decay (not in Algorithm 1; 0 by default).
        orthogonalize: False sends the group to the AdamW fallback.
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9), alpha: float = 1.0,
                 eps: float = 1e-8, frequency: int = 100, ns_steps: int = 5,
                 weight_decay: float = 0.0, orthogonalize: bool = True,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8) -> None:
        if lr < 0.0 or alpha < 0.0 or eps <= 0.0 or frequency < 1 or ns_steps < 1:
            raise ValueError("need lr >= 0, alpha >= 0, eps > 0, frequency >= 1, ns_steps >= 1")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "alpha": alpha, "eps": eps,
                    "frequency": frequency, "ns_steps": ns_steps, "weight_decay": weight_decay,
                    "orthogonalize": orthogonalize, "adam_betas": adam_betas,
                    "adam_eps": adam_eps}
        super().__init__(params, defaults)

    @staticmethod
    def _m3_step(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> None:
        beta1, beta2, beta3 = group["betas"]
        if not state:
            state["step"] = 0
            for name in ("fast", "slow", "slow_update", "second_moment", "chunk_grad_sum"):
                state[name] = torch.zeros_like(p)
        state["step"] += 1
        state["chunk_grad_sum"].add_(g)
        state["fast"].add_(g, alpha=beta1)
        state["second_moment"].addcmul_(g, g, value=beta2)
        o1 = newton_schulz(state["fast"], steps=group["ns_steps"])
        direction = o1.add_(state["slow_update"], alpha=group["alpha"])
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.addcdiv_(direction, (state["second_moment"] + group["eps"]).sqrt_(), value=-group["lr"])
        if state["step"] % group["frequency"] == 0:
            state["slow"].add_(state["chunk_grad_sum"], alpha=beta3)
            state["chunk_grad_sum"].zero_()
            state["slow_update"] = newton_schulz(state["slow"], steps=group["ns_steps"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() >= 2 and group["orthogonalize"]:
                    self._m3_step(p, p.grad, self.state[p], group)
                else:
                    adamw_fallback_step(p, p.grad, self.state[p], group)
        return loss
