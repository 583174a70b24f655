"""Surprise objectives: the same CMS run with and without the auxiliary surprise losses.

    python examples/surprise_example.py [--steps 300] [--preset small] [--out examples/out/surprise_example.png]

With surprise on, each weighted level also trains a head to predict its own surprise signal,
the (clipped, per-row) gradient of the task loss w.r.t. its output. The plot compares the
task loss of both runs and shows each level's auxiliary loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from cms_quickstart import regression_task, save_figure, squared_error

from nestlearn.train.level_loop import (
    LevelHistory,
    build_from_preset,
    load_level_clock_preset,
    train_loop_with_surprise,
)


def main(argv: list[str] | None = None) -> dict[str, LevelHistory]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="small | standard | large | a .yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=1e-3,
                        help="higher than the preset's 1e-4 so a short demo visibly learns")
    parser.add_argument("--every", type=int, default=1, help="compute surprise every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("examples/out/surprise_example.png"))
    args = parser.parse_args(argv)

    preset = load_level_clock_preset(args.preset)
    preset = dataclasses.replace(preset, base_lr=args.base_lr)
    data = regression_task(preset.input_size, args.batch_size, args.seed)
    runs: dict[str, LevelHistory] = {}
    for use_surprise in (False, True):
        torch.manual_seed(args.seed)  # both runs start from the same weights
        model, scheduler, optimizers, surprise = build_from_preset(preset)
        name = "with surprise" if use_surprise else "baseline"
        runs[name] = train_loop_with_surprise(
            model, data, squared_error, optimizers, scheduler, surprise,
            num_steps=args.steps, device="cpu", log_interval=100, use_surprise=use_surprise,
            compute_surprise_every_n_steps=args.every)
        print(f"{name:14s} loss {runs[name].losses[0]:.4f} -> {runs[name].losses[-1]:.4f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, history in runs.items():
        left.plot(history.steps, history.losses, lw=1, label=name)
    left.set(yscale="log", xlabel="step", ylabel="squared error", title="task loss")
    left.legend()
    surprised = runs["with surprise"]
    for level, values in surprised.aux_per_level.items():
        points = [(s, v) for s, v in zip(surprised.steps, values, strict=True) if not math.isnan(v)]
        right.plot(*zip(*points, strict=True), lw=1, label=level)
    right.set(yscale="log", xlabel="step", ylabel="weighted aux loss",
              title="surprise prediction loss per level")
    right.legend()
    save_figure(fig, args.out)
    return runs


if __name__ == "__main__":
    main()
