"""Momentum as an associative memory over gradients: the delta-rule and preconditioned variants.

Nested Learning reads SGD momentum (Eq. 17 of the NeurIPS text; Eq. 16-17 of arXiv 2512.24695 §4)
as a memory m that compresses gradients by one gradient step per optimizer step on an inner
objective. Changing that objective gives the two optimizers here:

* PreconditionedMomentum, Eq. 19-20 (arXiv Eq. 46-47): the dot-product objective with a value
  P_i, <m grad^T, P_i>, so the memory stores P_i grad instead of grad.
* DeltaMomentum, Eq. 21-22 (arXiv Eq. 48-49): the L2 objective ||m grad^T - P_i||^2, whose gradient
  step is the delta rule: the decay of the memory now depends on the current gradient.

Both keep the paper's convention: the buffer m is in weight units (the learning rate is inside it)
and the parameter moves by W <- W + m. Tensors of more than two dimensions are treated as the
matrix ``as_matrix(p)`` (out x rest), 1-D tensors as a 1 x n row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

from nestlearn.optim.closure import evaluate_closure
from nestlearn.optim.newton_schulz import as_matrix

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _right_gram_product(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """m (k^T k) for matrices m, k of shape (r, c), in the cheaper association order."""
    if k.shape[0] <= k.shape[1]:
        return (m @ k.mT) @ k
    return m @ (k.mT @ k)


class DeltaMomentum(torch.optim.Optimizer):
    """Delta-rule momentum: the momentum memory is fitted with an L2 (regression) objective.

    NeurIPS Eq. 21-22 (arXiv Eq. 48-49), with P_i = I, G_i = grad as a matrix (out x rest)::

        m_{i+1} = m_i (alpha I - delta K_i^T K_i) - lr G_i        K_i = G_i / ||G_i||_F  (normalize)
        W_{i+1} = W_i + m_{i+1}                                   K_i = G_i              (otherwise)

    It is one gradient step on ||m G_i^T - P_i||^2 with retention alpha: unlike the Hebbian
    momentum of Eq. 17 (``delta=0`` recovers it exactly), the memory forgets the part of its content
    that lies along the current gradient directions, so a stale direction is overwritten instead of
    low-pass filtered. Two choices the paper leaves open, made here:

    * Side: the paper prints ``(alpha I - G^T G) m``, which only type-checks for square W; the
      gradient of the stated objective w.r.t. m multiplies on the right, ``m (alpha I - G^T G)``, as
      the arXiv Eq. 49 writes it. We use the right product.
    * Scale: the printed decay uses G^T G with coefficient 1, which is unstable as soon as
      ||G||_2^2 > 1 + alpha. With ``normalize=True`` (default) the key is G / ||G||_F, as delta-rule
      memories normalise their keys (the same assumption as DGD's closed form); K^T K then has
      eigenvalues in [0, 1] summing to 1 and the decay stays in (-1, alpha] for delta <= 1 + alpha.
      ``normalize=False`` is the literal Eq. 22 (with ``delta=1``).

    Args:
        lr: eta, the step size inside the memory (the paper's eta_t).
        momentum: alpha, the retention of the memory.
        delta: the strength of the gradient-dependent decay (1 in the paper).
        normalize: normalise the key as above.
        weight_decay: decoupled decay, W <- W (1 - lr * weight_decay), applied before the step.
    """

    def __init__(self, params: Params, lr: float = 1e-2, momentum: float = 0.9,
                 delta: float = 1.0, normalize: bool = True, weight_decay: float = 0.0) -> None:
        if lr < 0.0 or not 0.0 <= momentum < 1.0 or delta < 0.0 or weight_decay < 0.0:
            raise ValueError("need lr >= 0, 0 <= momentum < 1, delta >= 0, weight_decay >= 0")
        defaults = {"lr": lr, "momentum": momentum, "delta": delta, "normalize": normalize,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                g = as_matrix(p.grad)
                key = g
                if group["normalize"]:
                    key = g / torch.linalg.matrix_norm(g).clamp_min(torch.finfo(g.dtype).tiny)
                buf = state["momentum_buffer"]
                m = as_matrix(buf)
                m_new = group["momentum"] * m - group["delta"] * _right_gram_product(m, key)
                m_new.add_(g, alpha=-group["lr"])
                buf.copy_(m_new.reshape(buf.shape))
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(buf)
        return loss


class PreconditionedMomentum(torch.optim.Optimizer):
    """Momentum whose memory maps each gradient to a value P_i (preconditioned momentum).

    NeurIPS Eq. 19-20 (arXiv Eq. 46-47)::

        m_{i+1} = alpha m_i - lr P_i G_i,        W_{i+1} = W_i + m_{i+1}

    The paper leaves P_i open ("a function of gradients, e.g. information about the Hessian");
    two curvature estimates from the gradients themselves are offered, both bias-corrected EMAs:

    * ``"diagonal"``: P_i G = G / (sqrt(v_hat) + eps), v = beta2 v + (1 - beta2) G*G (elementwise,
      a diagonal Fisher estimate; Adam preconditions its momentum, here the memory stores
      preconditioned gradients, which is what Eq. 20 writes).
    * ``"left"``: P_i = (L_hat + eps I)^(-1/2), L = beta2 L + (1 - beta2) G G^T, the literal
      left-matrix product of Eq. 20 (one-sided Shampoo). With beta2 = 0 it maps G to its polar
      factor U V^T, i.e. the memory stores orthogonalised gradients. Costs an eigendecomposition
      of an (out x out) matrix per step: meant for modest layers; give embeddings a ``"diagonal"``
      param group.

    Args:
        lr: eta, the step size inside the memory.
        momentum: alpha, the retention of the memory.
        beta2: EMA factor of the curvature statistic.
        eps: added to sqrt(v_hat) (diagonal) or to the eigenvalues of L_hat (left).
        preconditioner: ``"diagonal"`` or ``"left"`` (settable per param group).
        weight_decay: decoupled decay, applied before the step.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8,
                 preconditioner: Literal["diagonal", "left"] = "diagonal",
                 weight_decay: float = 0.0) -> None:
        if lr < 0.0 or not 0.0 <= momentum < 1.0 or not 0.0 <= beta2 < 1.0 or eps <= 0.0:
            raise ValueError("need lr >= 0, 0 <= momentum < 1, 0 <= beta2 < 1, eps > 0")
        if preconditioner not in ("diagonal", "left"):
            raise ValueError(f"preconditioner={preconditioner!r}; expected 'diagonal' or 'left'")
        defaults = {"lr": lr, "momentum": momentum, "beta2": beta2, "eps": eps,
                    "preconditioner": preconditioner, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @staticmethod
    def _precondition(grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        beta2: float = group["beta2"]
        eps: float = group["eps"]
        correction: float = 1.0 - beta2 ** state["step"]
        if group["preconditioner"] == "diagonal":
            v: torch.Tensor = state.setdefault("exp_avg_sq", torch.zeros_like(grad))
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            return grad / ((v / correction).sqrt_().add_(eps))
        g = as_matrix(grad)
        stat: torch.Tensor = state.setdefault("left_stat", g.new_zeros(g.shape[0], g.shape[0]))
        stat.mul_(beta2).add_(g @ g.mT, alpha=1.0 - beta2)
        evals: torch.Tensor
        evecs: torch.Tensor
        evals, evecs = torch.linalg.eigh(stat / correction)
        inv_root = (evals.clamp_min(0.0) + eps).rsqrt()
        return ((evecs * inv_root) @ (evecs.mT @ g)).reshape(grad.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(self._precondition(p.grad, state, group),
                                                 alpha=-group["lr"])
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(buf)
        return loss
