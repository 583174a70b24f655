"""Deep Momentum Gradient Descent: the momentum memory is an MLP trained by its own gradient step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from nestlearn.optim.closure import evaluate_closure
from nestlearn.optim.momentum import Params
from nestlearn.optim.newton_schulz import adamw_fallback_step, as_matrix, newton_schulz


class DeepMomentumGD(torch.optim.Optimizer):
    """DMGD, NeurIPS Eq. 23-24 (arXiv Eq. 50 and 52): momentum as a deep associative memory.

    The paper's rule is ``W_{i+1} = W_i + sigma(m_{i+1}(u_i))``, ``m_{i+1} = alpha m_i -
    eta grad L2(m_i; u_i)`` with u_i the gradient, m an MLP and L2 its inner objective. The paper
    does not fix the memory's input/output layout or L2; the concrete choice made here, per
    parameter with gradient U (viewed as an out x rest matrix, 1-D as 1 x n)::

        K     = U / rms(U)                                   key: the scale-free gradient
        m(K)  = B + tanh(K W1^T) W2^T                        memory: linear part B (out x rest)
                                                             + residual MLP on the rows of K
        L2    = -<m(K), U>                 (objective="dot", the paper's dot-product example)
              = 1/2 ||m(K) - U||_F^2       (objective="l2", the regression / delta variant)
        phi  <- alpha phi - inner_lr * dL2/dphi(phi)         for phi in (B, W1, W2): Eq. 23's
                                                             retention + one inner gradient step
        W    <- W (1 - lr wd) - lr * sigma(m(K))             with the updated memory, sigma = NS
                                                             (Eq. 24) or identity (Eq. 23)

    Signs: the paper adds sigma(m) and minimises the alignment; we subtract and maximise it, the
    same rule under m -> -m (NS is odd). The outer ``lr`` is needed because NS discards the scale.

    Special cases (tested): with ``hidden_dim=0`` the memory is the linear, value-less layer B and
    the inner step is ``B <- alpha B + inner_lr U``, i.e. SGD momentum (Eq. 17); adding
    ``sigma = Newton-Schulz`` gives exactly (non-Nesterov) Muon, ``W <- W - lr NS(B)``, which is
    the paper's claim under Eq. 24. With ``hidden_dim > 0``, W2 starts at zero so DMGD starts as
    that momentum and the MLP part learns a non-linear map of the gradients from there; W1 is
    drawn from N(0, 1/rest) with a generator seeded by ``seed`` and the parameter's position, so
    runs are reproducible and the global RNG is untouched.

    Params of fewer than two dimensions cannot be orthogonalised: with
    ``nonlinearity="newton_schulz"`` they take an AdamW step (``adam_betas``, ``adam_eps``, the
    group's lr), as Muon does; so does every param of a group with ``adamw_fallback=True``
    (embeddings, say). NS-scale lrs (~0.02) are far too large for AdamW: give 1-D params
    their own param group (``factory.param_groups`` already splits them) with an Adam-scale lr.

    Args:
        lr: outer step size.
        momentum: alpha, retention of every memory parameter.
        inner_lr: eta, the inner step size of the memory (1 makes B a plain momentum sum).
        hidden_dim: width of the MLP part; 0 gives a linear memory.
        objective: ``"dot"`` or ``"l2"``, the inner objective L2.
        nonlinearity: ``"newton_schulz"`` (Eq. 24) or ``"none"`` (Eq. 23).
        ns_steps: Newton-Schulz iterations.
        weight_decay: decoupled decay.
        seed: seed of the W1 initialisation.
    """

    def __init__(self, params: Params, lr: float = 0.02, momentum: float = 0.95,
                 inner_lr: float = 1.0, hidden_dim: int = 0,
                 objective: Literal["dot", "l2"] = "dot",
                 nonlinearity: Literal["newton_schulz", "none"] = "newton_schulz",
                 ns_steps: int = 5, weight_decay: float = 0.0,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 seed: int = 0) -> None:
        if lr < 0.0 or not 0.0 <= momentum < 1.0 or inner_lr < 0.0 or hidden_dim < 0:
            raise ValueError("need lr >= 0, 0 <= momentum < 1, inner_lr >= 0, hidden_dim >= 0")
        if objective not in ("dot", "l2") or nonlinearity not in ("newton_schulz", "none"):
            raise ValueError("objective must be 'dot'/'l2'; nonlinearity 'newton_schulz'/'none'")
        defaults = {"lr": lr, "momentum": momentum, "inner_lr": inner_lr,
                    "hidden_dim": hidden_dim, "objective": objective,
                    "nonlinearity": nonlinearity, "ns_steps": ns_steps,
                    "weight_decay": weight_decay, "adam_betas": adam_betas,
                    "adam_eps": adam_eps, "seed": seed}
        super().__init__(params, defaults)

    @staticmethod
    def _init_memory(p: torch.Tensor, group: dict[str, Any], position: int) -> dict[str, Any]:
        rows, cols = as_matrix(p).shape
        state: dict[str, Any] = {"memory_bias": p.new_zeros(rows, cols)}
        hidden = group["hidden_dim"]
        if hidden:
            gen = torch.Generator().manual_seed(group["seed"] * 1_000_003 + position)
            w1 = torch.randn(hidden, cols, generator=gen, dtype=torch.float64) / cols**0.5
            state["memory_in"] = w1.to(device=p.device, dtype=p.dtype)
            state["memory_out"] = p.new_zeros(cols, hidden)
        return state

    @staticmethod
    def _memory_step(u: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """One retention + inner gradient step on every memory parameter; returns m_{i+1}(K)."""
        alpha, eta = group["momentum"], group["inner_lr"]
        rms = torch.linalg.matrix_norm(u) / u.numel() ** 0.5
        key = u / rms.clamp_min(torch.finfo(u.dtype).tiny)
        b: torch.Tensor = state["memory_bias"]
        if "memory_in" not in state:  # linear memory: dL2/dB is the residual itself
            resid = -u if group["objective"] == "dot" else b - u
            return b.mul_(alpha).add_(resid, alpha=-eta)
        w1: torch.Tensor = state["memory_in"]
        w2: torch.Tensor = state["memory_out"]
        hidden = torch.tanh(key @ w1.mT)
        resid = -u if group["objective"] == "dot" else b + hidden @ w2.mT - u  # dL2 / d m(K)
        grad_w1 = ((resid @ w2) * (1.0 - hidden * hidden)).mT @ key
        grad_w2 = resid.mT @ hidden
        w1.mul_(alpha).add_(grad_w1, alpha=-eta)
        w2.mul_(alpha).add_(grad_w2, alpha=-eta)
        b.mul_(alpha).add_(resid, alpha=-eta)
        return b + torch.tanh(key @ w1.mT) @ w2.mT

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        position = 0
        for group in self.param_groups:
            use_ns = group["nonlinearity"] == "newton_schulz"
            for p in group["params"]:
                position += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if group.get("adamw_fallback", False) or (use_ns and p.dim() < 2):
                    adamw_fallback_step(p, p.grad, state, group)
                    continue
                if not state:
                    state.update(self._init_memory(p, group, position))
                out = self._memory_step(as_matrix(p.grad), state, group)
                if use_ns:
                    out = newton_schulz(out, steps=group["ns_steps"])
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(out.reshape(p.shape), alpha=-group["lr"])
        return loss
