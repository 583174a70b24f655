"""RegimeMarketEnv: gymnasium's API checks, determinism under a seed, the regime chain, and the
reward arithmetic on hand-made price paths."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from nestlearn.agents import ENV_ID, REGIMES, MarketPath, RegimeMarketEnv, simulate
from nestlearn.agents.market import RETURN_SCALE


def test_passes_gymnasiums_environment_checker_and_is_registered() -> None:
    check_env(RegimeMarketEnv(episode_length=50), skip_render_check=True)
    env = gymnasium.make(ENV_ID, episode_length=20)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (17,) and obs.dtype == np.float32


def rollout(env: RegimeMarketEnv, seed: int, actions: list[int]) -> tuple[list[np.ndarray], list[float], list[str]]:
    obs, info = env.reset(seed=seed)
    seen, rewards, regimes = [obs], [], [info["regime"]]
    for a in actions:
        obs, reward, _, _, info = env.step(a)
        seen.append(obs)
        rewards.append(reward)
        regimes.append(info["regime"])
    return seen, rewards, regimes


def test_a_seed_fixes_the_whole_episode_and_seeds_differ() -> None:
    actions = [2, 2, 0, 1, 0, 2] * 20
    a = rollout(RegimeMarketEnv(episode_length=200), 7, actions)
    b = rollout(RegimeMarketEnv(episode_length=200), 7, actions)
    c = rollout(RegimeMarketEnv(episode_length=200), 8, actions)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True)) and a[1:] == b[1:]
    assert a[1] != c[1]


def test_the_chain_switches_at_its_rate_and_visits_every_regime() -> None:
    path = simulate(np.random.default_rng(0), 200_000, REGIMES, switch_prob=0.01)
    switches = int(np.count_nonzero(np.diff(path.regimes)))
    assert abs(switches / 200_000 - 0.01) < 0.001  # a switch always moves to another regime
    shares = np.bincount(path.regimes, minlength=len(REGIMES)) / len(path.regimes)
    assert np.all(np.abs(shares - 0.25) < 0.03)
    for i, regime in enumerate(REGIMES):  # each regime's returns have its volatility
        mine = path.returns[path.regimes == i]
        if regime.reversion == 0:
            assert np.mean(mine) == pytest.approx(regime.drift, abs=4 * regime.volatility / math.sqrt(len(mine)))
        assert np.std(mine) == pytest.approx(regime.volatility, rel=0.1)


def test_rewards_are_position_times_the_next_return_less_costs() -> None:
    window, returns = 2, np.array([0.5, -0.5, 0.01, 0.02, -0.03, 0.04])
    regimes = np.array([0, 0, 0, 0, 1, 1])
    env = RegimeMarketEnv(episode_length=4, window=window, transaction_cost=0.001,
                          path=MarketPath(returns, regimes))
    obs, info = env.reset()
    assert np.allclose(obs, [0.5 * RETURN_SCALE, -0.5 * RETURN_SCALE, 0.0]) and info["regime"] == "trend_up"
    steps = [env.step(a) for a in (2, 2, 0, 1)]  # long, stay long, short, flat
    rewards = [s[1] for s in steps]
    assert rewards == pytest.approx([0.01 - 0.001, 0.02, 0.03 - 0.002, 0.0 - 0.001])
    assert [s[4]["regime_switched"] for s in steps] == [False, False, True, False]
    assert [s[4]["regime"] for s in steps] == ["trend_up", "trend_up", "trend_down", "trend_down"]
    assert [s[3] for s in steps] == [False, False, False, True]  # truncated at the episode's end
    assert np.allclose(steps[1][0], [0.01 * RETURN_SCALE, 0.02 * RETURN_SCALE, 1.0])


def test_bad_settings_and_actions_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"switch_prob=1.5 must be a probability"):
        RegimeMarketEnv(switch_prob=1.5)
    with pytest.raises(ValueError, match=r"path holds 3 returns; expected window \+ episode_length = 5"):
        RegimeMarketEnv(episode_length=3, window=2, path=MarketPath(np.zeros(3), np.zeros(3, np.int64)))
    env = RegimeMarketEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action 3 is not one of 0 \(short\), 1 \(flat\), 2 \(long\)"):
        env.step(3)
