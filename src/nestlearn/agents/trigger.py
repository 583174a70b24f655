"""Trigger-gated self-modification: fast weights that learn in context only when a learned
trigger fires (the agents seed: "regime change detected -> trigger self-modification").

`TriggeredFastWeights` reads a sequence (e.g. the recent returns an observation holds) token by
token with a linear fast-weight memory W that predicts the next token's value from the current
one. At each token a trigger, a small network of the token and of W's current surprise
(its prediction error), gives a firing probability g_t; W then takes a DGD step (`dgd_update`,
the paper's Eq. 28-29) on its prediction loss with rate eta x g_t. In calm stretches the trigger
can stay shut and W keeps what it knows; after a regime change the error jumps and the trigger
can open. Everything is differentiable, so the trigger, W's initial value and eta train through
the policy's loss. `firing_rate` holds the mean g of the last call, for logging.

`TriggeredMemoryExtractor` puts it in a stable-baselines3 policy (`features_extractor_class`) for
observations laid out as `RegimeMarketEnv`'s: a window of returns, then the position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn


class TriggeredFastWeights(nn.Module):
    """Sequences (B, T, d_in) -> features (B, d_model): the last token's embedding and W's read
    of it, after W has learnt, where the trigger let it, along the sequence."""

    def __init__(self, d_in: int, d_model: int = 16, hidden: int = 16, lr: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.w0 = nn.Parameter(torch.zeros(d_model, d_model))
        self.trigger = nn.Sequential(nn.Linear(d_model + 1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr)))
        self.firing_rate = 0.0

    def forward(self, seq: Tensor) -> Tensor:
        x = torch.nn.functional.normalize(self.embed(seq), dim=-1)  # unit keys keep the steps stable
        batch, length, d = x.shape
        w = self.w0.expand(batch, d, d)
        fired = []
        for t in range(length - 1):
            k, v = x[:, t], x[:, t + 1]
            surprise = (torch.einsum("bij,bj->bi", w, k) - v).pow(2).sum(-1, keepdim=True)
            g = torch.sigmoid(self.trigger(torch.cat([k, surprise], dim=-1)))  # (B, 1)
            w = gated_delta_step(w, k, v, self.log_lr.exp() * g.squeeze(-1))
            fired.append(g)
        self.firing_rate = float(torch.cat(fired).detach().mean()) if fired else 0.0
        last = x[:, -1]
        return torch.cat([last, torch.einsum("bij,bj->bi", w, last)], dim=-1)


def gated_delta_step(w: Tensor, k: Tensor, v: Tensor, rate: Tensor) -> Tensor:
    """Per sample b: W_b - rate_b (W_b k_b - v_b) k_b^T, the DGD step on 1/2 ||W k - v||^2
    (`optim.dgd.dgd_update(W_b, k_b, -v_b, rate_b)`), batched with a rate per sample."""
    error = torch.einsum("bij,bj->bi", w, k) - v
    return w - rate[:, None, None] * torch.einsum("bi,bj->bij", error, k)


class TriggeredMemoryExtractor(BaseFeaturesExtractor):
    """stable-baselines3 features: `TriggeredFastWeights` over the observation's window of
    returns (all entries but the last), and the last entry (the position) as it is."""

    def __init__(self, observation_space: spaces.Box, d_model: int = 16, **kwargs: Any) -> None:
        super().__init__(observation_space, features_dim=2 * d_model + 1)
        self.memory = TriggeredFastWeights(1, d_model, **kwargs)

    def forward(self, observations: Tensor) -> Tensor:
        window, position = observations[:, :-1], observations[:, -1:]
        return torch.cat([self.memory(window.unsqueeze(-1)), position], dim=-1)
