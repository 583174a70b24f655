"""The agents examples run end to end on a tiny budget and write their plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dqn_nested_trains_both_agents_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "dqn.png"
    result = load_script("examples/dqn_nested.py").main(["--steps", "800", "--out", str(out)])
    assert out.stat().st_size > 1000 and result["plain"] and result["nested"]
    assert len(result["multipliers"]) == 800 and all(0.1 <= m <= 2.0 for m in result["multipliers"])


def test_regime_trading_plays_a_held_out_episode_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "trading.png"
    episodes = load_script("examples/regime_trading.py").main(["--steps", "256", "--out", str(out)])
    assert out.stat().st_size > 1000
    for episode in episodes.values():
        assert len(episode["rewards"]) == len(episode["regimes"]) == 500
    firing = episodes["PPO + triggered fast weights"]["firing"]
    assert len(firing) == 500 and all(0.0 <= f <= 1.0 for f in firing)
