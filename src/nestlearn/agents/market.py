"""`RegimeMarketEnv`: a synthetic market whose price process switches regimes on a hidden Markov
chain, the continual-learning test of the agents seed ("bull to bear without retraining").

Each step the agent picks a position (short, flat, long) and earns that position times the next
log return, less `transaction_cost` per unit of position changed. The log price follows the
current regime: a drift and a volatility, plus, for a mean-reverting regime, a pull towards the
log price at which the regime began. The regime is hidden; `info` reports it (and whether it
just switched) for evaluation only. A reset with a seed fixes the whole path, so runs and
comparisons are reproducible; `path=` replays given log returns instead (tests, real data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

POSITIONS = (-1, 0, 1)  # action 0 short, 1 flat, 2 long
RETURN_SCALE = 100.0  # observations are log returns in percent: O(1) numbers for a network


@dataclass(frozen=True)
class Regime:
    """One state of the hidden chain: per-step drift and volatility of the log price, and the
    strength of the pull back to the regime's starting log price (0: none)."""

    name: str
    drift: float
    volatility: float
    reversion: float = 0.0


REGIMES = (
    Regime("trend_up", drift=0.002, volatility=0.01),
    Regime("trend_down", drift=-0.002, volatility=0.01),
    Regime("mean_reverting", drift=0.0, volatility=0.01, reversion=0.2),
    Regime("high_volatility", drift=0.0, volatility=0.03),
)


@dataclass(frozen=True)
class MarketPath:
    """A whole episode's history: log returns (`window` of warm-up history first) and the regime
    index of each return."""

    returns: np.ndarray
    regimes: np.ndarray


def simulate(rng: np.random.Generator, steps: int, regimes: tuple[Regime, ...], switch_prob: float) -> MarketPath:
    """`steps` log returns: the chain stays with probability 1 - switch_prob, else moves to one
    of the other regimes uniformly; it starts in a uniformly drawn regime."""
    index = np.empty(steps, dtype=np.int64)
    returns = np.empty(steps, dtype=np.float64)
    current = int(rng.integers(len(regimes)))
    offset = 0.0  # log price relative to where the current regime began
    for t in range(steps):
        if t and rng.random() < switch_prob:
            current = (current + 1 + int(rng.integers(len(regimes) - 1))) % len(regimes)
            offset = 0.0
        r = regimes[current]
        step = r.drift - r.reversion * offset + r.volatility * float(rng.standard_normal())
        offset += step
        index[t], returns[t] = current, step
    return MarketPath(returns, index)


class RegimeMarketEnv(gymnasium.Env[np.ndarray, np.int64]):
    """Gymnasium environment: observation = the last `window` log returns (in percent) and the
    current position; action = short / flat / long; reward = position x next log return -
    transaction_cost x |position change|; an episode is `episode_length` steps (truncated)."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium's class attribute)

    def __init__(self, episode_length: int = 500, window: int = 16, transaction_cost: float = 1e-3,
                 switch_prob: float = 0.01, regimes: tuple[Regime, ...] = REGIMES,
                 path: MarketPath | None = None) -> None:
        if episode_length < 1 or window < 1:
            raise ValueError(f"episode_length and window must be >= 1 (got {episode_length}, {window})")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob={switch_prob} must be a probability in [0, 1]")
        if transaction_cost < 0:
            raise ValueError(f"transaction_cost={transaction_cost} must be >= 0")
        if len(regimes) < 2:
            raise ValueError(f"a regime-switching market needs >= 2 regimes, got {len(regimes)}")
        if path is not None and len(path.returns) != window + episode_length:
            raise ValueError(f"path holds {len(path.returns)} returns; expected window + episode_length = "
                             f"{window + episode_length}")
        self.episode_length, self.window, self.transaction_cost = episode_length, window, transaction_cost
        self.switch_prob, self.regimes, self.fixed_path = switch_prob, regimes, path
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(window + 1,), dtype=np.float32)
        self.action_space = spaces.Discrete(len(POSITIONS))
        self.path = path or MarketPath(np.zeros(window + episode_length), np.zeros(window + episode_length, np.int64))
        self.t, self.position = 0, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.path = self.fixed_path or simulate(self.np_random, self.window + self.episode_length,
                                                self.regimes, self.switch_prob)
        self.t, self.position = 0, 0
        return self._observation(), self._info(switched=False)

    def step(self, action: int | np.int64) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not one of 0 (short), 1 (flat), 2 (long)")
        new = POSITIONS[int(action)]
        now = self.window + self.t  # the return earned over this step
        reward = new * float(self.path.returns[now]) - self.transaction_cost * abs(new - self.position)
        switched = bool(self.path.regimes[now] != self.path.regimes[now - 1])
        self.position, self.t = new, self.t + 1
        truncated = self.t >= self.episode_length
        return self._observation(), reward, False, truncated, self._info(switched)

    def _observation(self) -> np.ndarray:
        end = self.window + self.t
        recent = self.path.returns[end - self.window:end] * RETURN_SCALE
        return np.append(recent, self.position).astype(np.float32)

    def _info(self, switched: bool) -> dict[str, Any]:
        """The hidden regime of the last return seen, for evaluation (agents must not read it)."""
        regime = int(self.path.regimes[self.window + self.t - 1])
        return {"regime": self.regimes[regime].name, "regime_switched": switched, "position": self.position}
