"""Final loss after a fixed budget: each optimizer against AdamW on three tasks, several seeds.

Tasks:
  lm          the pilot Transformer++ (`--config`) on the default corpus, trained by the
              Trainer (`nestlearn.pipeline`) for `--steps` steps (--quick: batches of 8 x 128
              tokens instead of the config's); metric: final validation loss.
  regression  ill-conditioned linear regression (feature scales 1 … 10⁻², condition number
              10⁴ of XᵀX), mini-batches of 64; metric: final full-data MSE (noise floor 0.01).
  bc          behaviour cloning of `examples/behaviour_cloning.py` (MLP policy); metric:
              final validation MSE (noise floor 0.0025).

Learning rates: for each optimizer and task, five rates (centre × 1/9 … 9, a factor 3 apart)
are tried on seed 0 and the best (lowest final loss) is kept; the table reports mean ± std
over `--seeds` seeds at that rate, so every optimizer is shown at its best of five rates,
tuned on seed 0 (a best rate at an end of the grid is flagged). All other options are
the config's defaults (the nested optimizer: the port guide's `nested_optimizer:` defaults).

    python benchmarks/optimizer_quality.py --quick
    python benchmarks/optimizer_quality.py --steps 100 --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nestlearn import pipeline
from nestlearn.config import OptimizerConfig, RunConfig, load_config
from nestlearn.data import PreparedData
from nestlearn.optim import DeepNestedOptimizer, build_optimizer
from nestlearn.utils.io import atomic_write_json

Kind = Literal["adamw", "nested", "dmgd", "delta_momentum", "m3"]
OPTIMIZERS: tuple[Kind, ...] = ("adamw", "delta_momentum", "dmgd", "m3", "nested")
# Centre of each learning-rate grid (the grid is centre × GRID); delta_momentum is
# plain-gradient scaled (its buffer is in weight units), so it needs larger rates.
CENTRES: dict[str, dict[str, float]] = {
    "lm": {"adamw": 3e-3, "delta_momentum": 0.1, "dmgd": 3e-3, "m3": 3e-3, "nested": 3e-3},
    "regression": {"adamw": 1e-2, "delta_momentum": 0.1, "dmgd": 1e-2, "m3": 1e-2,
                   "nested": 1e-2},
    "bc": {"adamw": 3e-3, "delta_momentum": 0.1, "dmgd": 3e-3, "m3": 3e-3, "nested": 3e-3},
}
GRID = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
BC_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "behaviour_cloning.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="transformer/pilot_smoke")
    p.add_argument("--tasks", default="lm,regression,bc")
    p.add_argument("--steps", type=int, help="LM steps (default 60; --quick 20)")
    p.add_argument("--seeds", type=int, help="seeds per optimizer (default 3; --quick 2)")
    p.add_argument("--max-chars", type=int, default=1_000_000,
                   help="data.max_chars_per_source of the LM corpus")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="a smaller budget for a first look")
    p.add_argument("--out", default="benchmarks/results/optimizer_quality.json")
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 60)
    args.seeds = args.seeds or (2 if args.quick else 3)
    if args.steps < 1 or args.seeds < 1 or args.threads < 1:
        p.error("--steps, --seeds and --threads must be >= 1")
    return args


def small_loop(model: nn.Module, cfg: OptimizerConfig, loss_fn: Callable[[], Tensor],
               steps: int) -> None:
    """The Trainer's update for non-LM tasks: the nested optimizer clips itself, others at 1."""
    opt = build_optimizer(cfg, model)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        if isinstance(opt, DeepNestedOptimizer):
            opt.step(loss.item())
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()


def optimizer_config(kind: Kind, lr: float) -> OptimizerConfig:
    """Constant rate, no warmup, no weight decay: the small tasks compare update rules only."""
    return OptimizerConfig(type=kind, lr=lr, weight_decay=0.0, warmup_steps=0,
                           schedule="constant")


def regression_task(kind: Kind, lr: float, seed: int, quick: bool) -> float:
    g = torch.Generator().manual_seed(seed)
    n, d = 2048, 32
    scales = torch.logspace(0, -2, d)  # XᵀX condition number ≈ (10²)² = 10⁴
    x = torch.randn(n, d, generator=g) * scales
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1)
    order = torch.randint(0, n, (10_000, 64), generator=g)
    step = iter(range(10_000))

    def loss_fn() -> Tensor:
        idx = order[next(step)]
        return nn.functional.mse_loss(model(x[idx]), y[idx])

    small_loop(model, optimizer_config(kind, lr), loss_fn, 150 if quick else 400)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def load_bc_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("behaviour_cloning", BC_EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's names through it
    spec.loader.exec_module(module)
    return module


def bc_task(bc: ModuleType, kind: Kind, lr: float, seed: int, quick: bool) -> float:
    states, actions = bc.demonstrations(64, 50, 0.05, seed)
    val_states, val_actions = bc.demonstrations(16, 50, 0.05, seed + 1000)
    model: nn.Module = bc.make_policy(seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, states.shape[0], (10_000, 64), generator=g)
    step = iter(range(10_000))

    def loss_fn() -> Tensor:
        idx = order[next(step)]
        return nn.functional.mse_loss(model(states[idx]), actions[idx])

    small_loop(model, optimizer_config(kind, lr), loss_fn, 300 if quick else 1000)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(val_states), val_actions))


def lm_task(base: RunConfig, data: PreparedData, root: Path, kind: Kind, lr: float,
            seed: int) -> float:
    optimizer = dataclasses.replace(base.optimizer, type=kind, lr=lr)
    cfg = dataclasses.replace(base, name=f"{kind}_lr{lr:g}_s{seed}", seed=seed,
                              out_dir=str(root), optimizer=optimizer)
    _, final = pipeline.train(cfg, data, resume=None, log=lambda _: None)
    return float(final["val_loss"])


def run_task(task: str, run: Callable[[Kind, float, int], float], seeds: int,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Sweep the grid on seed 0, then the other seeds at the best rate; one row per optimizer."""
    rows: list[dict[str, Any]] = []
    for kind in OPTIMIZERS:
        sweep = {}
        for factor in GRID:
            lr = CENTRES[task][kind] * factor
            start = time.perf_counter()
            sweep[lr] = run(kind, lr, 0)
            log(f"{task} {kind} lr {lr:.3g} seed 0: {sweep[lr]:.4f} "
                f"({time.perf_counter() - start:.0f}s)")
        finite = {lr: v for lr, v in sweep.items() if v == v and v != float("inf")}
        best = min(finite, key=finite.__getitem__) if finite else CENTRES[task][kind]
        losses = [sweep[best], *(run(kind, best, seed) for seed in range(1, seeds))]
        rows.append({"task": task, "optimizer": kind, "best_lr": best,
                     "best_at_grid_edge": best in (CENTRES[task][kind] * GRID[0],
                                                   CENTRES[task][kind] * GRID[-1]),
                     "sweep_seed0": {f"{lr:.3g}": v for lr, v in sweep.items()},
                     "losses": losses, "mean": statistics.fmean(losses),
                     "std": statistics.stdev(losses) if len(losses) > 1 else 0.0})
        log(f"{task} {kind}: best lr {best:.3g}, final loss "
            f"{rows[-1]['mean']:.4f} ± {rows[-1]['std']:.4f}")
    adamw = float(rows[0]["mean"])
    for row in rows:
        row["vs_adamw"] = float(row["mean"]) / adamw
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'task':<11} {'optimizer':<15} {'best lr':>8} {'final loss (mean ± std)':>26} " \
             f"{'/ AdamW':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['task']:<11} {r['optimizer']:<15} {r['best_lr']:>8.3g} "
              f"{r['mean']:>15.4f} ± {r['std']:<8.4f} {r['vs_adamw']:>8.3f}"
              + ("  (best lr at grid edge)" if r["best_at_grid_edge"] else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    if set(tasks) - set(CENTRES):
        print(f"unknown tasks {sorted(set(tasks) - set(CENTRES))}; expected some of "
              f"{list(CENTRES)}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] = {"seeds": args.seeds, "quick": args.quick, "grid": GRID,
                                "centres": CENTRES}
    if "regression" in tasks:
        rows += run_task("regression",
                         lambda k, lr, s: regression_task(k, lr, s, args.quick), args.seeds, log)
    if "bc" in tasks:
        bc = load_bc_example()
        rows += run_task("bc", lambda k, lr, s: bc_task(bc, k, lr, s, args.quick),
                         args.seeds, log)
    if "lm" in tasks:
        base = load_config(args.config, [
            f"data.max_chars_per_source={args.max_chars}", f"train.steps={args.steps}",
            f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}",
            f"train.threads={args.threads}", "train.eval_batches=8", "logging.progress=none",
            f"optimizer.warmup_steps={max(1, args.steps // 10)}",
            *(["train.batch_size=8", "train.seq_len=128"] if args.quick else [])])
        data = pipeline.prepare(base, log=lambda _: None)
        base = pipeline.with_vocab(base, data)
        settings.update(lm_config=args.config, lm_steps=args.steps, max_chars=args.max_chars,
                        lm_batch=[base.train.batch_size, base.train.seq_len])
        with tempfile.TemporaryDirectory() as root:
            rows += run_task("lm", lambda k, lr, s: lm_task(base, data, Path(root), k, lr, s),
                             args.seeds, log)
    print_table(rows)
    atomic_write_json(args.out, {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": settings, "results": rows,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
