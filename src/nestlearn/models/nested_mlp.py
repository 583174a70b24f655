"""A three-level Continuum Memory System MLP for the level clocks of `nestlearn.optim`.

    y = B_slow(B_medium(B_fast(x))),   B(h) = h + W2 gelu(W1 h + b1) + b2

Each block is one level (`level1_fast`, `level2_medium`, `level3_slow`) that a
`ChunkedUpdateScheduler` updates at its own frequency; `levels()` tells `setup_optimizers`
which parameters each level owns. These are plain modules, not registry language models.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LEVEL_NAMES = ("level1_fast", "level2_medium", "level3_slow")


class LevelBlock(nn.Module):
    """One CMS level: a residual two-layer MLP, so a level near zero passes its input on."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = h + self.fc2(F.gelu(self.fc1(h)))
        return out


class NestedModel(nn.Module):
    """The CMS chain over the last dimension of x ([..., input_size] -> [..., input_size])."""

    def __init__(self, input_size: int = 768, hidden_size: int = 3072) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"sizes must be positive, got input_size={input_size}, "
                             f"hidden_size={hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.level1_fast = LevelBlock(input_size, hidden_size)
        self.level2_medium = LevelBlock(input_size, hidden_size)
        self.level3_slow = LevelBlock(input_size, hidden_size)

    def blocks(self) -> dict[str, LevelBlock]:
        """The level blocks in forward order."""
        return {"level1_fast": self.level1_fast, "level2_medium": self.level2_medium,
                "level3_slow": self.level3_slow}

    def levels(self) -> dict[str, list[nn.Parameter]]:
        """Level name -> the parameters it owns (what `setup_optimizers` groups by)."""
        return {name: list(block.parameters()) for name, block in self.blocks().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks().values():
            x = block(x)
        return x


class SurpriseForward(NamedTuple):
    """Output plus, per level, its output y_l (in the loss graph) and its prediction p_l."""

    output: torch.Tensor
    activations: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]


class NestedModelWithSurprise(NestedModel):
    """`NestedModel` plus one linear surprise head per level, owned by that level.

    `forward_with_surprise` returns what `nestlearn.optim.surprise.SurpriseLossComputer`
    needs: y_l, and p_l = head_l(B_l(h_{l-1}.detach())). Recomputing the block on its detached
    input costs one extra block forward per level but keeps each auxiliary loss level-local.
    """

    def __init__(self, input_size: int = 768, hidden_size: int = 3072) -> None:
        super().__init__(input_size, hidden_size)
        self.surprise_heads = nn.ModuleDict(
            {name: nn.Linear(input_size, input_size) for name in LEVEL_NAMES}
        )

    def levels(self) -> dict[str, list[nn.Parameter]]:
        levels = super().levels()
        for name, params in levels.items():
            params.extend(self.surprise_heads[name].parameters())
        return levels

    def forward_with_surprise(self, x: torch.Tensor) -> SurpriseForward:
        activations: dict[str, torch.Tensor] = {}
        predictions: dict[str, torch.Tensor] = {}
        h = x
        for name, block in self.blocks().items():
            y = block(h)
            # The model input needs no detaching: the first block's graph is already local.
            local = block(h.detach()) if h.requires_grad else y
            predictions[name] = self.surprise_heads[name](local)
            activations[name] = y
            h = y
        return SurpriseForward(h, activations, predictions)
