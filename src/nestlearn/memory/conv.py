"""The short causal depthwise convolution that both memories apply to their inputs (Titans §4.4,
Nested Learning §8.3), written for CPU training speed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _shifted_sum(padded: Tensor, weight: Tensor) -> Tensor:
    kernel = weight.shape[-1]
    t = padded.shape[1] - kernel + 1
    w = weight[:, 0]
    out = padded[:, :t] * w[:, 0]
    for j in range(1, kernel):
        out = torch.addcmul(out, padded[:, j:j + t], w[:, j])
    return out


class _CausalConv(torch.autograd.Function):
    """``_shifted_sum`` with a backward that writes each shifted gradient into one buffer
    instead of zero-filling a padded-size tensor per shift. Plain differentiable ops, so a
    ``create_graph`` backward can be differentiated again."""

    @staticmethod
    def forward(ctx: Any, padded: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(padded, weight)
        return _shifted_sum(padded, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        padded, weight = ctx.saved_tensors
        kernel, t = weight.shape[-1], grad.shape[1]
        g_padded = grad.new_zeros(padded.shape)
        for j in range(kernel):
            g_padded[:, j:j + t].addcmul_(grad, weight[:, 0, j])
        g_weight = torch.stack([(grad * padded[:, j:j + t]).sum((0, 1)) for j in range(kernel)], -1)
        return g_padded, g_weight.unsqueeze(1)


def causal_depthwise_conv(padded: Tensor, weight: Tensor) -> Tensor:
    """``conv1d(padded.mT, weight, groups=C).mT`` for padded ``(B, T + K - 1, C)``, weight
    ``(C, 1, K)``: K shifted multiply-adds in the time-major layout, which on CPU beat the
    depthwise conv1d kernel and its backward and need no transposes."""
    if torch.is_grad_enabled() and (padded.requires_grad or weight.requires_grad):
        out: Tensor = _CausalConv.apply(padded, weight)  # type: ignore[no-untyped-call]
        return out
    return _shifted_sum(padded, weight)
