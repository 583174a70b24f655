"""Nested learning for reinforcement-learning agents (the `rl` extra: gymnasium, stable-baselines3).

`RegimeMarketEnv` is registered with gymnasium as ``nestlearn/RegimeMarket-v0``.
"""

import gymnasium

from nestlearn.agents.experience import NestedExperienceMemory
from nestlearn.agents.market import REGIMES, MarketPath, Regime, RegimeMarketEnv, simulate
from nestlearn.agents.replay import NestedDQN, NestedReplayBuffer
from nestlearn.agents.trigger import TriggeredFastWeights, TriggeredMemoryExtractor
from nestlearn.optim.lr_controller import NestedDQNOptimizer, NestedLRController

ENV_ID = "nestlearn/RegimeMarket-v0"
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="nestlearn.agents.market:RegimeMarketEnv")

__all__ = [
    "ENV_ID",
    "REGIMES",
    "MarketPath",
    "NestedDQN",
    "NestedDQNOptimizer",
    "NestedExperienceMemory",
    "NestedLRController",
    "NestedReplayBuffer",
    "Regime",
    "RegimeMarketEnv",
    "TriggeredFastWeights",
    "TriggeredMemoryExtractor",
    "simulate",
]
