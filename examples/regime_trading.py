"""PPO trading a regime-switching market, with and without trigger-gated fast weights.

Both agents see the last 16 returns and their position in `RegimeMarketEnv`; the nested one
reads the returns through `TriggeredMemoryExtractor` (fast weights that learn in context when a
learned trigger fires). After `--steps` steps of training each plays one held-out episode; the
plot shows the price path with its hidden regimes shaded, both agents' cumulative rewards and
the trigger's firing rate on that path.

    python examples/regime_trading.py
    python examples/regime_trading.py --steps 4000 --out trading.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import PPO

from nestlearn.agents import REGIMES, RegimeMarketEnv, TriggeredMemoryExtractor
from nestlearn.eval.report import png_figure
from nestlearn.utils.io import atomic_write_bytes


def play(model: PPO, seed: int) -> dict[str, Any]:
    """One deterministic episode: rewards, regimes, log prices, and the trigger's firing rates."""
    env = RegimeMarketEnv()
    obs, _ = env.reset(seed=seed)
    rewards, regimes, firing = [], [], []
    extractor = model.policy.features_extractor
    done = False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        if isinstance(extractor, TriggeredMemoryExtractor):
            firing.append(extractor.memory.firing_rate)
        obs, reward, terminated, truncated, info = env.step(int(action))
        rewards.append(float(reward))
        regimes.append(info["regime"])
        done = terminated or truncated
    prices = np.cumsum(env.path.returns[env.window:])
    return {"rewards": rewards, "regimes": regimes, "prices": prices, "firing": firing}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="regime_trading.png")
    args = p.parse_args(argv)
    agents = {
        "PPO": PPO("MlpPolicy", RegimeMarketEnv(), seed=args.seed),
        "PPO + triggered fast weights": PPO("MlpPolicy", RegimeMarketEnv(), seed=args.seed,
                                            policy_kwargs={"features_extractor_class": TriggeredMemoryExtractor}),
    }
    episodes = {}
    for name, model in agents.items():
        model.learn(args.steps)
        episodes[name] = play(model, seed=10_000 + args.seed)
        print(f"{name}: held-out episode return {sum(episodes[name]['rewards']):.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    first = next(iter(episodes.values()))
    colours = dict(zip((r.name for r in REGIMES), ("tab:green", "tab:red", "tab:blue", "tab:orange"), strict=True))
    for t, regime in enumerate(first["regimes"]):
        ax.axvspan(t, t + 1, color=colours[regime], alpha=0.15, lw=0)
    ax.plot(first["prices"], color="black", lw=1)
    ax.set_ylabel("log price (shaded: hidden regime)")
    for name, ep in episodes.items():
        bx.plot(np.cumsum(ep["rewards"]), label=name)
    bx.set_ylabel("cumulative reward")
    bx.set_xlabel("step")
    bx.legend(fontsize=8)
    nested = episodes["PPO + triggered fast weights"]["firing"]
    if nested:
        cx = bx.twinx()
        cx.plot(nested, color="gray", lw=0.7, alpha=0.6)
        cx.set_ylabel("trigger firing rate", color="gray")
    atomic_write_bytes(Path(args.out), png_figure(fig, plt))
    print(f"wrote {args.out}")
    return episodes


if __name__ == "__main__":
    main()
