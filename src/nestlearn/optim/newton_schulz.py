"""Newton-Schulz orthogonalisation and the helpers shared by the matrix-aware optimizers.

Every optimizer of this package that needs an orthogonalised update (DeepMomentumGD with
``nonlinearity="newton_schulz"``, M3) calls :func:`newton_schulz`, so they all use the same
iteration. NS is only defined for matrices; parameters it cannot treat (biases, gains, scalars;
for M3 also a group with ``orthogonalize=False``) take the AdamW step of
:func:`adamw_fallback_step`, as Muon does.
"""

from __future__ import annotations

from typing import Any

import torch

# Quintic coefficients of Muon (Jordan et al., 2024): chosen to push every singular value of the
# normalised input into roughly [0.7, 1.2] within five steps, rather than to converge exactly to 1.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as a matrix: (d0, rest) for >= 2-D (a conv kernel is out x in*k*k), (1, n) else."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of g = U S V^T (Muon's quintic iteration).

    X_0 = G / (||G||_F + eps);  X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,  A_k = X_k X_k^T,
    with (a, b, c) = NS_COEFFICIENTS. Tensors of more than two dimensions are orthogonalised as
    ``as_matrix(g)`` and reshaped back. The iteration runs on the wide orientation (the Gram matrix
    is the smaller side) and in at least fp32: bf16/fp16 inputs would lose the small singular
    directions; float64 inputs stay float64 so tests can compare exactly.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (>= 2-D tensor), got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    compute_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    x: torch.Tensor = as_matrix(g).to(compute_dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.reshape(g.shape).to(g.dtype)


def adamw_fallback_step(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                        group: dict[str, Any]) -> None:
    """One AdamW step (bias-corrected, decoupled decay) for params Newton-Schulz cannot handle.

    Reads ``lr``, ``weight_decay``, ``adam_betas`` and ``adam_eps`` from the param group and keeps
    its moments under ``adam_*`` keys of ``state`` so they never collide with the main rule's state.
    """
    beta1, beta2 = group["adam_betas"]
    if "adam_step" not in state:
        state["adam_step"] = 0
        state["adam_m"] = torch.zeros_like(p)
        state["adam_v"] = torch.zeros_like(p)
    state["adam_step"] += 1
    t = state["adam_step"]
    m, v = state["adam_m"], state["adam_v"]
    m.lerp_(grad, 1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (v / (1.0 - beta2**t)).sqrt_().add_(group["adam_eps"])
    p.mul_(1.0 - group["lr"] * group["weight_decay"])
    p.addcdiv_(m, denom, value=-group["lr"] / (1.0 - beta1**t))

