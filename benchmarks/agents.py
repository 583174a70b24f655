"""Nested learning inside RL agents: does a nested optimizer or the experience memory help?

DQN and PPO (stable-baselines3) on CartPole-v1, Acrobot-v1 and `RegimeMarketEnv`, each with AdamW, the
nested LR controller (`NestedLRController`), `DeepNestedOptimizer` and M3; DQN also with the
nested experience memory (`NestedDQN` + `NestedReplayBuffer`). Each run trains `--steps`
environment steps at stable-baselines3's default settings (the optimizer swapped, its rate
the algorithm's default), then plays `--eval-episodes` deterministic episodes on fresh seeds:
the mean return, and on the market the mean reward per step over the `--after-switch` steps that
follow each regime switch (how fast a policy copes with a new regime) beside its mean reward per
step overall. A run diverges when training raises on a non-finite value or leaves a non-finite
parameter; divergent runs are counted per row and left out of the means.

Every finished run is kept in the `--json` file, so the same command resumes a study that was
cut off; the table (mean ± std over seeds) is printed and `--plot` drawn from it.

    python benchmarks/agents.py                                  # the full study (hours)
    python benchmarks/agents.py --steps 2000 --seeds 1 --algos dqn --envs cartpole
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium
import torch
from stable_baselines3 import DQN, PPO

from nestlearn.agents import NestedDQN, NestedReplayBuffer, RegimeMarketEnv
from nestlearn.agents.sb3_optimizers import OPTIMIZERS, policy_optimizer
from nestlearn.eval.report import png_figure
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json, read_json

ENVS = ("cartpole", "acrobot", "market")
GYM_IDS = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1"}
ALGOS = ("dqn", "ppo")


def make_env(name: str) -> gymnasium.Env[Any, Any]:
    return gymnasium.make(GYM_IDS[name]) if name in GYM_IDS else RegimeMarketEnv()


def runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for algo in args.algos:
        for env in args.envs:
            for optimizer in args.optimizers:
                for memory in ((False, True) if algo == "dqn" else (False,)):
                    for seed in range(args.seeds):
                        name = f"{algo}_{env}_{optimizer}{'_memory' if memory else ''}_s{seed}"
                        out.append({"name": name, "algo": algo, "env": env, "optimizer": optimizer,
                                    "memory": memory, "seed": seed})
    return out


def train(run: dict[str, Any], args: argparse.Namespace) -> Any:
    env = make_env(run["env"])
    policy_kwargs = policy_optimizer(run["optimizer"])
    if run["algo"] == "ppo":
        return PPO("MlpPolicy", env, seed=run["seed"], policy_kwargs=policy_kwargs).learn(args.steps)
    if run["memory"]:
        return NestedDQN("MlpPolicy", env, seed=run["seed"], replay_buffer_class=NestedReplayBuffer,
                         policy_kwargs=policy_kwargs).learn(args.steps)
    return DQN("MlpPolicy", env, seed=run["seed"], policy_kwargs=policy_kwargs).learn(args.steps)


def evaluate(model: Any, run: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Deterministic episodes on seeds no training episode used: mean return, and on the market
    the reward per step overall and in the steps after each regime switch."""
    returns, per_step, after_switch = [], [], []
    for episode in range(args.eval_episodes):
        env = make_env(run["env"])
        obs, _ = env.reset(seed=10_000 + 100 * run["seed"] + episode)
        total, since_switch, done = 0.0, math.inf, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, info = env.step(int(action))
            total += float(reward)
            per_step.append(float(reward))
            since_switch = 0 if info.get("regime_switched") else since_switch + 1
            if since_switch < args.after_switch:
                after_switch.append(float(reward))
            done = terminated or truncated
        returns.append(total)
    figures = {"return": statistics.fmean(returns)}
    if run["env"] == "market":
        figures["reward_per_step"] = statistics.fmean(per_step)
        figures["reward_after_switch"] = statistics.fmean(after_switch) if after_switch else math.nan
    return figures


def one_run(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(run["seed"])
    start = time.perf_counter()
    try:
        model = train(run, args)
    except (ValueError, RuntimeError) as exc:  # a distribution or loss of NaNs
        return {**run, "diverged": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    if not all(torch.isfinite(p).all() for p in model.policy.parameters()):
        return {**run, "diverged": "non-finite parameters after training"}
    return {**run, "diverged": None, "train_s": time.perf_counter() - start, **evaluate(model, run, args)}


def table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str, str, bool], list[dict[str, Any]]] = {}
    for r in results.values():
        rows.setdefault((r["algo"], r["env"], r["optimizer"], r["memory"]), []).append(r)
    out = []
    for (algo, env, optimizer, memory), group in sorted(rows.items()):
        ok = [r for r in group if not r["diverged"]]
        row: dict[str, Any] = {"algo": algo, "env": env, "optimizer": optimizer, "memory": memory,
                               "seeds": len(group), "diverged": len(group) - len(ok)}
        for key in ("return", "reward_per_step", "reward_after_switch"):
            values = [r[key] for r in ok if key in r and math.isfinite(r[key])]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.pstdev(values)
        out.append(row)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'algo':<4} {'env':<9} {'optimizer':<12} {'memory':<6} {'seeds':>5} {'div.':>4} "
          f"{'return (± std)':>20} {'reward/step':>12} {'after switch':>12}")
    for r in rows:
        ret = f"{r['return']:.2f} ± {r['return_std']:.2f}" if "return" in r else "-"
        step = f"{r['reward_per_step'] * 1e3:.3f}e-3" if "reward_per_step" in r else ""
        after = f"{r['reward_after_switch'] * 1e3:.3f}e-3" if "reward_after_switch" in r else ""
        print(f"{r['algo']:<4} {r['env']:<9} {r['optimizer']:<12} {'yes' if r['memory'] else 'no':<6} "
              f"{r['seeds']:>5} {r['diverged']:>4} {ret:>20} {step:>12} {after:>12}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["algo"], r["env"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (algo, env) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if (r["algo"], r["env"]) == (algo, env) and "return" in r]
        labels = [f"{r['optimizer']}{'+mem' if r['memory'] else ''}" for r in mine]
        ax.bar(range(len(mine)), [r["return"] for r in mine], yerr=[r["return_std"] for r in mine])
        ax.set_xticks(range(len(mine)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{algo.upper()} on {env}")
        ax.set_ylabel("mean return")
    atomic_write_bytes(path, png_figure(fig, plt))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--envs", default=",".join(ENVS))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=30_000, help="environment steps per run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--after-switch", type=int, default=20, help="steps after a regime switch that count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/agents.json")
    p.add_argument("--plot", default="benchmarks/results/agents.png", help="'' for none")
    args = p.parse_args(argv)
    for option, known in (("algos", ALGOS), ("envs", ENVS), ("optimizers", tuple(OPTIMIZERS))):
        chosen = [x for x in getattr(args, option).split(",") if x]
        if unknown := sorted(set(chosen) - set(known)):
            p.error(f"--{option}: unknown {unknown}; expected some of {', '.join(known)}")
        setattr(args, option, chosen)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    saved = read_json(path) if path.exists() else {}
    results: dict[str, dict[str, Any]] = dict(saved.get("runs", {}))
    settings = {k: getattr(args, k) for k in ("steps", "eval_episodes", "after_switch")}
    if saved and saved.get("settings") != settings:
        raise SystemExit(f"{path} holds runs made with {saved.get('settings')}, not {settings}; use another --json")
    todo = [r for r in runs(args) if r["name"] not in results]
    for i, run in enumerate(todo, 1):
        result = one_run(run, args)
        results[run["name"]] = result
        atomic_write_json(path, {"settings": settings, "runs": results})
        status = result["diverged"] or f"return {result['return']:.2f} ({result['train_s']:.0f} s)"
        print(f"[{i}/{len(todo)}] {run['name']}: {status}", flush=True)
    rows = table({k: v for k, v in results.items() if k in {r["name"] for r in runs(args)}})
    print_table(rows)
    atomic_write_json(path, {"settings": settings, "runs": results, "table": rows})
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
