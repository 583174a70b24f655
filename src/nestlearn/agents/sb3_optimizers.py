"""The library's optimizers as stable-baselines3 `optimizer_class` / `optimizer_kwargs` pairs.

stable-baselines3 builds a policy's optimizer as `optimizer_class(policy.parameters(), lr=...,
**optimizer_kwargs)`. AdamW, `NestedLRController` and M3 take that call as they are;
`DeepNestedOptimizer` takes a module (the port guide's interface: it groups parameters by their
names), so `deep_nested_optimizer` wraps the parameters in one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nestlearn.optim import M3, DeepNestedOptimizer, NestedLRController


class _Parameters(nn.Module):
    """A module holding given parameters (by reference), for optimizers that take a module."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(list(params))


def deep_nested_optimizer(params: Iterable[nn.Parameter], lr: float = 1e-3, **kwargs: Any) -> DeepNestedOptimizer:
    """`DeepNestedOptimizer` over `params`, called the way stable-baselines3 calls an optimizer class."""
    return DeepNestedOptimizer(_Parameters(params), base_lr=lr, **kwargs)


OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {}),
    "nested_lr": (NestedLRController, {}),
    "deep_nested": (deep_nested_optimizer, {}),
    "m3": (M3, {}),
}


def policy_optimizer(name: str) -> dict[str, Any]:
    """`policy_kwargs` entries that give a stable-baselines3 policy the optimizer `name`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    optimizer_class, kwargs = OPTIMIZERS[name]
    return {"optimizer_class": optimizer_class, "optimizer_kwargs": dict(kwargs)}
