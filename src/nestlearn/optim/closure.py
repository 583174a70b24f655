"""The `step(closure)` convention of torch optimizers, shared by ours."""

from __future__ import annotations

from collections.abc import Callable

import torch


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the loss with gradients enabled (steps run under `no_grad`), if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
