"""NestedController: learned, bounded learning-rate multipliers per parameter group.

The controller is the slow level of the nested optimizer: it watches training signals (loss and
its trend, gradient norm, progress, depth, memory-or-core) and scales each group's learning
rate. Its outputs pass through a sigmoid into [min_mult, max_mult], so no meta-learning mishap
can drive a learning rate to zero or to a divergent size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

N_FEATURES = 6


def controller_features(
    loss: Tensor | None,
    ema_loss: Tensor | None,
    group_grad_sq: Tensor,
    step: int,
    group_depths: Tensor,
    group_is_memory: Tensor,
) -> Tensor:
    """Build the `[n_groups, N_FEATURES]` controller input; smooth in loss and gradients.

    Columns: asinh(loss) (log-like, defined for negative losses); tanh of the loss's relative
    change against its running mean (the trend); log of the squared group gradient norm / 20
    (≈ log-norm / 10); log1p(step) / 10 (progress); mean normalised depth; memory flag.
    All columns are O(1), so the controller needs no input statistics.
    """
    n_groups = group_grad_sq.shape[0]
    ref = group_grad_sq
    if loss is None:
        level = trend = ref.new_zeros(())
    else:
        level = torch.asinh(loss)
        trend = (ref.new_zeros(()) if ema_loss is None
                 else torch.tanh((loss - ema_loss) / (ema_loss.abs() + 1e-8)))
    columns = [
        level.expand(n_groups),
        trend.expand(n_groups),
        torch.log(group_grad_sq + 1e-20) / 20.0,
        ref.new_full((n_groups,), math.log1p(step) / 10.0),
        group_depths.to(ref),
        group_is_memory.to(ref),
    ]
    return torch.stack(columns, dim=-1)


class NestedController(nn.Module):
    """Map per-group features `[n_groups, N_FEATURES]` to LR multipliers `[n_groups]`.

    One small MLP is shared by all groups (the memory flag and depth tell groups apart), so it
    works for any number of groups. It starts at exactly 1.0 for every group: the last layer is
    zero and its bias sits at the sigmoid's pre-image of 1.0, so an untrained controller is the
    plain base optimizer.
    """

    def __init__(self, hidden_dim: int = 32, min_mult: float = 0.1, max_mult: float = 2.0,
                 n_features: int = N_FEATURES) -> None:
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim={hidden_dim} is invalid; expected an integer >= 1")
        if not 0.0 < min_mult < 1.0 < max_mult:
            raise ValueError(
                f"(min_mult, max_mult)=({min_mult}, {max_mult}) is invalid; "
                "expected 0 < min_mult < 1 < max_mult"
            )
        self.min_mult = min_mult
        self.max_mult = max_mult
        self.net = nn.Sequential(nn.Linear(n_features, hidden_dim), nn.Tanh(),
                                 nn.Linear(hidden_dim, 1))
        last = self.net[2]
        assert isinstance(last, nn.Linear)
        unit = (1.0 - min_mult) / (max_mult - min_mult)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(math.log(unit / (1.0 - unit)))

    def forward(self, features: Tensor) -> Tensor:
        safe = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
        z = self.net(safe).squeeze(-1)
        return self.min_mult + (self.max_mult - self.min_mult) * torch.sigmoid(z)
