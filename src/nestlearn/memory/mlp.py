"""The memory MLP (Titans §3.1, "Memory Architecture") and the closed-form gradient of the
associative loss (Eq. 12).

Layer l of a depth-L memory maps ``a^(l-1) -> u^(l) = W^(l) a^(l-1)``, with ``a^(0) = k``,
``a^(l) = act(u^(l))`` for l < L and output ``u^(L)`` (plus ``k`` when ``residual``, the
Nested Learning variant M(k) = k + MLP(k)). There are no biases, as in the paper's
``M = W`` linear case, so every per-token gradient of a layer is one rank-1 outer product
``δ^(l) ⊗ z^(l)`` (z^(l) = a^(l-1), the layer input) and the chunked path never has to
materialise per-token weights.

The loss is the paper's ℓ(M; k, v) = ||M(k) - v||²₂ (Eq. 12), *without* a 1/2: its gradient
with respect to the output is 2 (M(k) - v). (Eq. 17 of the paper drops that factor of 2; here
it stays in the gradient, i.e. θ_t multiplies the true gradient of Eq. 12.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory import cpu_kernels

Activation = Literal["silu", "gelu"]


@dataclass(frozen=True)
class MemoryMLPSpec:
    """Shape of a per-head memory: ``depth`` layers on vectors of size ``dim``; hidden width
    ``round(expansion * dim)`` when ``depth >= 2``."""

    dim: int
    depth: int = 2
    expansion: float = 4.0
    activation: Activation = "silu"
    residual: bool = False

    def __post_init__(self) -> None:
        if self.dim < 1 or self.depth < 1:
            raise ValueError(f"memory dim and depth must be >= 1, got {self.dim}, {self.depth}")
        if self.activation not in ("silu", "gelu"):
            raise ValueError(f"activation must be 'silu' or 'gelu', got {self.activation!r}")
        if self.depth >= 2 and self.hidden < 1:
            raise ValueError(f"expansion {self.expansion} gives an empty hidden layer")

    @property
    def hidden(self) -> int:
        return round(self.expansion * self.dim)

    def shapes(self) -> list[tuple[int, int]]:
        """``(out, in)`` of each layer."""
        if self.depth == 1:
            return [(self.dim, self.dim)]
        h = self.hidden
        return [(h, self.dim)] + [(h, h)] * (self.depth - 2) + [(self.dim, h)]


def activate(u: Tensor, activation: Activation) -> Tensor:
    return F.silu(u) if activation == "silu" else F.gelu(u)


def activation_derivative(u: Tensor, activation: Activation) -> Tensor:
    """d act / du, written with differentiable ops (the outer loop backpropagates through it)."""
    if activation == "silu":
        s = torch.sigmoid(u)
        return s * (1 + u * (1 - s))
    cdf = 0.5 * (1 + torch.erf(u / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    return cdf + u * pdf


def activation_vjp(grad: Tensor, u: Tensor, activation: Activation) -> Tensor:
    """grad ⊙ act'(u): one fused kernel (the backward of ``activate``), or, when autograd
    records (the kernels have no derivative of their own), ``activation_derivative``."""
    if torch.is_grad_enabled():
        return grad * activation_derivative(u, activation)
    out: Tensor = (torch.ops.aten.silu_backward(grad, u) if activation == "silu"
                   else torch.ops.aten.gelu_backward(grad, u))
    return out


def activation_second_derivative(u: Tensor, activation: Activation) -> Tensor:
    """d² act / du², for the hand-written backward of the closed-form gradients (``chunked``)."""
    if activation == "silu":
        s = torch.sigmoid(u)
        return s * (1 - s) * (2 + u * (1 - 2 * s))
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    return pdf * (2 - u * u)


def linear(w: Tensor, a: Tensor, kernel: str | None = None) -> Tensor:
    """``W a`` for a batch of row vectors: w ``(..., out, in)``, a ``(..., n, in)``. ``kernel``:
    the config switch under which the product runs on nestlearn's CPU kernel
    (``cpu_kernels.matmul``, which names it if the build fails); ``None``: torch's."""
    return cpu_kernels.matmul(a, w.transpose(-1, -2), kernel)


def mlp_forward(layers: Sequence[Tensor], x: Tensor, spec: MemoryMLPSpec, kernel: str | None = None) -> Tensor:
    """M(x) (the retrieval M*(q) of Eq. 15 when x = q): layers ``(..., out, in)``, x ``(..., n, d)``;
    ``kernel`` as in ``linear``."""
    a = x
    for i, w in enumerate(layers):
        a = linear(w, a, kernel)
        if i < len(layers) - 1:
            a = activate(a, spec.activation)
    return a + x if spec.residual else a


@dataclass(frozen=True)
class RankOneGrads:
    """Per-token gradients ∇_{W^(l)} ℓ = δ^(l)_t ⊗ z^(l)_t: ``deltas[l]`` is ``(..., n, out_l)``,
    ``inputs[l]`` is ``(..., n, in_l)``."""

    deltas: tuple[Tensor, ...]
    inputs: tuple[Tensor, ...]

    def sq_norm(self) -> Tensor:
        """Σ_l ||δ^(l)_t ⊗ z^(l)_t||²_F = Σ_l ||δ||² ||z||², shape ``(..., n)``."""
        total = self.deltas[0].square().sum(-1) * self.inputs[0].square().sum(-1)
        for d, z in zip(self.deltas[1:], self.inputs[1:], strict=True):
            total = total + d.square().sum(-1) * z.square().sum(-1)
        return total


@dataclass(frozen=True)
class LossGradsTrace:
    """``l2_loss_grads`` with the intermediates a backward through it needs, per hidden layer
    l < L: ``pre`` u^(l), ``slopes`` act'(u^(l)) and ``back`` W^(l+1)ᵀ δ^(l+1) (so that
    δ^(l) = back ⊙ slopes)."""

    grads: RankOneGrads
    pre: tuple[Tensor, ...]
    slopes: tuple[Tensor, ...]
    back: tuple[Tensor, ...]


def l2_loss_grads(layers: Sequence[Tensor], k: Tensor, v: Tensor, spec: MemoryMLPSpec) -> RankOneGrads:
    """Closed-form backward of ℓ = ||M(k_t) - v_t||² for every token at once (no autograd).

    dℓ/du^(L) = 2 (M(k) - v); dℓ/du^(l) = (W^(l+1)ᵀ dℓ/du^(l+1)) ⊙ act'(u^(l)).
    """
    return l2_loss_grads_trace(layers, k, v, spec).grads


def l2_loss_grads_trace(layers: Sequence[Tensor], k: Tensor, v: Tensor,
                        spec: MemoryMLPSpec) -> LossGradsTrace:
    """``l2_loss_grads`` and its intermediates (``LossGradsTrace``)."""
    inputs: list[Tensor] = []
    pre: list[Tensor] = []
    a = k
    for i, w in enumerate(layers):
        inputs.append(a)
        a = linear(w, a)
        if i < len(layers) - 1:
            pre.append(a)
            a = activate(a, spec.activation)
    out = a + k if spec.residual else a
    delta = 2 * (out - v)
    deltas, slopes, back = [delta], [], []
    for i in range(len(layers) - 1, 0, -1):
        back.append(delta @ layers[i])
        slopes.append(activation_derivative(pre[i - 1], spec.activation))
        delta = back[-1] * slopes[-1]
        deltas.append(delta)
    return LossGradsTrace(RankOneGrads(tuple(reversed(deltas)), tuple(inputs)), tuple(pre),
                          tuple(reversed(slopes)), tuple(reversed(back)))
