"""AdamW on level clocks: one optimizer object whose param groups fire at their own frequency.

`optimizer.type: chunked` in a run config. The model declares its levels (`levels()` and
`level_chunk_sizes()`, the `HasLevels` protocol of `level_clock`); each level becomes a param
group with `chunk_size` C and lr = `level_lr(base_lr, C, rule)` (`optimizer.level_lr`: the
seed's base_lr / C by default, which under AdamW moves a level 1/C² as far per token as the fast
one and trained HOPE best; `sqrt` matches the fast level on noisy gradients). Between firings a
level's gradients accumulate in `.grad` (PyTorch's `+=`), so when it fires it applies the sum
of its whole chunk's gradients; `zero_grad` clears only the groups that just fired. Being one
`torch.optim.Optimizer`, it checkpoints, resumes and takes an LR schedule like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nestlearn.optim.level_clock import LevelLrRule, level_lr, level_parameters


class ChunkedAdamW(torch.optim.AdamW):
    """AdamW whose param groups update once every `chunk_size` calls of `step()`.

    The call count lives in every group (`clock`), so it travels in `state_dict()`.
    """

    def __init__(self, groups: list[dict[str, Any]], **adamw_kwargs: Any) -> None:
        for group in groups:
            size = group.get("chunk_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"every group needs an integer chunk_size >= 1, got {size!r}")
            group.setdefault("clock", 0)
        super().__init__(groups, **adamw_kwargs)

    def firing_groups(self) -> list[dict[str, Any]]:
        """Groups that the next `step()` updates."""
        return [g for g in self.param_groups if (g["clock"] + 1) % g["chunk_size"] == 0]

    def firing_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.firing_groups() for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        firing = self.firing_groups()
        every = self.param_groups
        self.param_groups = firing
        try:
            loss: float | None = super().step(closure)
        finally:
            self.param_groups = every
        for group in every:
            group["clock"] += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of groups that just fired; slower groups keep accumulating."""
        for group in self.param_groups:
            if group["clock"] % group["chunk_size"] == 0:
                for p in group["params"]:
                    if set_to_none:
                        p.grad = None
                    elif p.grad is not None:
                        p.grad.zero_()


def chunked_groups(model: nn.Module, chunk_sizes: Mapping[str, int], base_lr: float,
                   weight_decay: float, lr_rule: LevelLrRule = "mean") -> list[dict[str, Any]]:
    """A group per (level, decay/no-decay), lr = `level_lr(base_lr, chunk size, lr_rule)`."""
    groups: list[dict[str, Any]] = []
    for level, params in level_parameters(model, list(chunk_sizes)).items():
        size = chunk_sizes[level]
        for decay, members in ((weight_decay, [p for p in params if p.dim() >= 2]),
                               (0.0, [p for p in params if p.dim() < 2])):
            if members:
                groups.append({"params": members, "level": level, "chunk_size": size,
                               "lr": level_lr(base_lr, size, lr_rule), "weight_decay": decay})
    return groups
