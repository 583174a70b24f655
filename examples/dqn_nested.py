"""DQN on CartPole with the nested parts, beside stable-baselines3's plain DQN.

The nested agent is `NestedDQN` with the three-level `NestedReplayBuffer` (prioritised by a
learned gate, an episodic store of important transitions) and the `NestedLRController`
optimizer (Adam whose rate a controller sets from the loss, gradients and TD errors). Both train
for `--steps` environment steps from the same seed; the plot shows each one's episode returns
during training and the nested controller's learning-rate multiplier.

    python examples/dqn_nested.py
    python examples/dqn_nested.py --steps 5000 --out dqn.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import gymnasium
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor

from nestlearn.agents import NestedDQN, NestedLRController, NestedReplayBuffer
from nestlearn.eval.report import png_figure
from nestlearn.utils.io import atomic_write_bytes


class Multipliers(BaseCallback):
    """Records the controller's multiplier after every environment step."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def _on_step(self) -> bool:
        optimizer = self.model.policy.optimizer
        if isinstance(optimizer, NestedLRController):
            self.values.append(optimizer.last_multipliers[0])
        return True


def train(nested: bool, steps: int, seed: int) -> tuple[list[float], list[float]]:
    env = Monitor(gymnasium.make("CartPole-v1"))
    common: dict[str, Any] = {"learning_starts": 500, "seed": seed, "exploration_fraction": 0.2}
    if nested:
        model: DQN = NestedDQN("MlpPolicy", env, replay_buffer_class=NestedReplayBuffer,
                               policy_kwargs={"optimizer_class": NestedLRController}, **common)
    else:
        model = DQN("MlpPolicy", env, **common)
    callback = Multipliers()
    model.learn(steps, callback=callback)
    return [float(r) for r in env.get_episode_rewards()], callback.values


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dqn_nested.png")
    args = p.parse_args(argv)
    plain, _ = train(False, args.steps, args.seed)
    nested, multipliers = train(True, args.steps, args.seed)
    for name, returns in (("DQN", plain), ("nested DQN", nested)):
        last = returns[-10:]
        print(f"{name}: {len(returns)} episodes, mean return of the last {len(last)}: "
              f"{sum(last) / max(len(last), 1):.1f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot(plain, label="DQN (Adam, uniform replay)")
    ax.plot(nested, label="nested DQN (LR controller, nested replay)")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    ax.legend(fontsize=8)
    bx.plot(multipliers)
    bx.set_xlabel("environment step")
    bx.set_ylabel("learning-rate multiplier")
    atomic_write_bytes(Path(args.out), png_figure(fig, plt))
    print(f"wrote {args.out}")
    return {"plain": plain, "nested": nested, "multipliers": multipliers}


if __name__ == "__main__":
    main()
