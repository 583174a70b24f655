"""The short causal depthwise convolution that both memories apply to their inputs (Titans §4.4,
Nested Learning §8.3), written for CPU training speed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nestlearn.utils.compiling import call_compiled


def _shifted_sum(padded: Tensor, weight: Tensor) -> Tensor:
    kernel = weight.shape[-1]
    t = padded.shape[1] - kernel + 1
    w = weight[:, 0]
    out = padded[:, :t] * w[:, 0]
    for j in range(1, kernel):
        out = torch.addcmul(out, padded[:, j:j + t], w[:, j])
    return out


def _shifted_sum_backward(grad: Tensor, padded: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``_shifted_sum`` wrt padded and weight, for an output gradient ``grad``:
    each shifted gradient is added into one buffer (no zero-filled padded-size tensor per
    shift). Plain differentiable ops, so a ``create_graph`` backward can be differentiated."""
    kernel, t = weight.shape[-1], grad.shape[1]
    g_padded = grad.new_zeros(padded.shape)
    for j in range(kernel):
        g_padded[:, j:j + t].addcmul_(grad, weight[:, 0, j])
    g_weight = torch.stack([(grad * padded[:, j:j + t]).sum((0, 1)) for j in range(kernel)], -1)
    return g_padded, g_weight.unsqueeze(1)


@functools.cache
def _compiled() -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    """``_shifted_sum`` and its backward under ``torch.compile`` (``compile_option``): each
    becomes one or two passes over the (B, T, C) tensors instead of K (forward) and 2K
    (backward) memory-bound ones. Batch and length are dynamic: one compile serves them all."""
    return (torch.compile(_shifted_sum, dynamic=True), torch.compile(_shifted_sum_backward, dynamic=True))


class _CausalConv(torch.autograd.Function):
    """``_shifted_sum`` with the hand-written ``_shifted_sum_backward``; with a
    ``compile_option`` both run through ``_compiled`` where no graph is recorded (a
    ``create_graph`` backward stays eager)."""

    @staticmethod
    def forward(ctx: Any, padded: Tensor, weight: Tensor, compile_option: str | None) -> Tensor:
        ctx.save_for_backward(padded, weight)
        ctx.compile_option = compile_option
        if compile_option is None:
            return _shifted_sum(padded, weight)
        return call_compiled(compile_option, _compiled()[0], padded, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        padded, weight = ctx.saved_tensors
        if ctx.compile_option is None or torch.is_grad_enabled():
            g_padded, g_weight = _shifted_sum_backward(grad, padded, weight)
        else:
            g_padded, g_weight = call_compiled(ctx.compile_option, _compiled()[1], grad, padded, weight)
        return g_padded, g_weight, None


def causal_depthwise_conv(padded: Tensor, weight: Tensor, compile_option: str | None = None) -> Tensor:
    """``conv1d(padded.mT, weight, groups=C).mT`` for padded ``(B, T + K - 1, C)``, weight
    ``(C, 1, K)``: K shifted multiply-adds in the time-major layout, which on CPU beat the
    depthwise conv1d kernel and its backward and need no transposes. ``compile_option``: the
    config switch that asks for ``torch.compile`` (e.g. ``model.self_ref.compile``; ``None``:
    eager); the fused passes (``_compiled``) then run when a graph is recorded, and a failure
    to compile is one line naming the switch."""
    if torch.is_grad_enabled() and (padded.requires_grad or weight.requires_grad):
        out: Tensor = _CausalConv.apply(padded, weight, compile_option)  # type: ignore[no-untyped-call]
        return out
    return _shifted_sum(padded, weight)
