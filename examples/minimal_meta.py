"""Minimal meta-learning demo: a meta-network learns the inner learning rate and momentum.

Prints loss, lr and momentum per step of a short training simulation on a toy regression and
writes a PNG of the curves. Runs in seconds on a CPU:

    python examples/minimal_meta.py --steps 60 --k 2 --out examples/out/minimal_meta.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from nestlearn.optim.meta_step import MetaOptimizer, nested_training_step


class MainModel(nn.Module):
    """Levels 1-3: a small feed-forward network whose weights are the slow memory."""

    def __init__(self, d_in: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--k", type=int, default=1, help="inner steps unrolled per outer step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("examples/out/minimal_meta.png"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = torch.randn(128, 8)
    target = data @ torch.randn(8, 1) + 0.1 * torch.randn(128, 1)
    model = MainModel()
    meta = MetaOptimizer()
    meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-2, weight_decay=1e-4)
    buffers: dict[str, torch.Tensor] = {}
    history: dict[str, list[float]] = {"loss": [], "lr": [], "momentum": []}
    for step in range(args.steps):
        out = nested_training_step(model, meta, meta_opt, data, target, nn.functional.mse_loss,
                                   buffers, k=args.k)
        for key in history:
            history[key].append(out[key])
        print(f"Step {step:3d} | loss {out['loss']:.4f} | lr {out['lr']:.2e} "
              f"| momentum {out['momentum']:.3f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, history, strict=True):
        ax.plot(history[key])
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
