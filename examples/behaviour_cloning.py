"""Behaviour cloning of a scripted controller: DeepNestedOptimizer against Adam.

The expert is a saturated PD controller that drives a 2-D point mass to the origin,
a = clip(-K_p x - K_d v, -1, 1); demonstrations are its noisy actions along its own noisy
rollouts. An MLP policy state → action is fitted by MSE with `optimizer_type: nested`
(the port guide's DeepNestedOptimizer, options from its `nested_optimizer:` block, loop
`loss.backward(); optimizer.step(loss.item())`, no LR scheduler) and with `torch.optim.Adam`.
Prints per-epoch losses and the `nested/*` metrics, and writes a PNG of the curves. The nested
optimizer starts as exactly Adam's rule and, with the port guide's meta_lr = 1e-4, its learned
multipliers move by ~1e-3 in this budget: expect the two curves to nearly coincide. About
10 seconds on a CPU:

    python examples/behaviour_cloning.py --epochs 20 --out examples/out/behaviour_cloning.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from nestlearn.optim import DeepNestedOptimizer
from nestlearn.train.progress import format_fields

KP, KD, DT = 2.0, 1.5, 0.1  # expert gains and the simulation time step
BC_CONFIG: dict[str, Any] = {  # the port guide's `bc:` block
    "lr": 3e-3,
    "optimizer_type": "nested",
    "nested_optimizer": {
        "meta_lr": 1e-4, "k_unroll": 5, "cms_frequencies": [1, 10, 100],
        "momentum_hidden_dim": 64, "controller_hidden_dim": 32,
        "use_gradient_checkpointing": True, "mode": "simple", "meta_update_freq": 100,
        "weight_decay": 0.0,
    },
}


def expert(states: Tensor) -> Tensor:
    """The scripted policy: saturated PD control towards the origin; states are (x, v) ∈ R⁴."""
    return torch.clamp(-KP * states[:, :2] - KD * states[:, 2:], -1.0, 1.0)


def demonstrations(n_episodes: int, horizon: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """(states, noisy expert actions) along noisy expert rollouts from random starts."""
    g = torch.Generator().manual_seed(seed)
    s = torch.cat([torch.rand(n_episodes, 2, generator=g) * 4 - 2,
                   torch.randn(n_episodes, 2, generator=g)], dim=1)
    states, actions = [], []
    for _ in range(horizon):
        a = expert(s) + noise * torch.randn(n_episodes, 2, generator=g)
        states.append(s)
        actions.append(a)
        v = s[:, 2:] + DT * a
        s = torch.cat([s[:, :2] + DT * v, v], dim=1)
    return torch.cat(states), torch.cat(actions)


def make_policy(seed: int, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 2))


def make_optimizer(model: nn.Module, bc_config: dict[str, Any]) -> torch.optim.Optimizer:
    """The port guide's optimizer creation: DeepNestedOptimizer for 'nested', else Adam."""
    lr = bc_config.get("lr", 3e-4)
    if bc_config.get("optimizer_type", "adam") == "nested":
        n = bc_config.get("nested_optimizer", {})
        return DeepNestedOptimizer(
            model=model, base_lr=lr, meta_lr=n.get("meta_lr", 1e-4),
            k_unroll=n.get("k_unroll", 5), cms_frequencies=n.get("cms_frequencies", [1, 10, 100]),
            momentum_hidden_dim=n.get("momentum_hidden_dim", 64),
            controller_hidden_dim=n.get("controller_hidden_dim", 32),
            use_gradient_checkpointing=n.get("use_gradient_checkpointing", True),
            mode=n.get("mode", "simple"), meta_update_freq=n.get("meta_update_freq", 100),
            weight_decay=n.get("weight_decay", 0.0), max_grad_norm=1.0)
    return torch.optim.Adam(model.parameters(), lr=lr)


@dataclass
class History:
    """Per-epoch mean training loss and validation loss, plus per-epoch nested metrics."""

    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    nested: list[dict[str, float]] = field(default_factory=list)


def train_policy(bc_config: dict[str, Any], data: tuple[Tensor, Tensor],
                 val: tuple[Tensor, Tensor], epochs: int, batch_size: int, seed: int,
                 label: str = "policy", verbose: bool = True) -> History:
    """Fit a fresh policy by MSE in the port guide's loop; returns the loss history."""
    model = make_policy(seed)
    optimizer = make_optimizer(model, bc_config)
    states, actions = data
    g = torch.Generator().manual_seed(seed)
    history = History()
    for epoch in range(epochs):
        order = torch.randperm(states.shape[0], generator=g)
        total, batches = 0.0, 0
        for i in range(0, states.shape[0], batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.mse_loss(model(states[idx]), actions[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if isinstance(optimizer, DeepNestedOptimizer):
                optimizer.step(loss.item())  # clips internally; its controller owns the LR
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            total += loss.item()
            batches += 1
        with torch.no_grad():
            history.val.append(float(nn.functional.mse_loss(model(val[0]), val[1])))
        history.train.append(total / batches)
        fields: dict[str, Any] = {"loss": history.train[-1], "val_loss": history.val[-1]}
        if isinstance(optimizer, DeepNestedOptimizer):
            history.nested.append(optimizer.nested_metrics())
            fields.update(history.nested[-1])
        if verbose:
            print(f"[{label}] epoch {epoch + 1}/{epochs} | "
                  + " | ".join(format_fields(fields)))
    return history


def plot(histories: dict[str, History], out: Path) -> None:
    fig, (ax_loss, ax_mult) = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in histories.items():
        epochs = range(1, len(h.train) + 1)
        ax_loss.plot(epochs, h.train, label=f"{name} train")
        ax_loss.plot(epochs, h.val, "--", label=f"{name} val")
        if h.nested:
            for key in ("nested/lr_multiplier_core", "nested/lr_multiplier_memory"):
                ax_mult.plot(epochs, [m[key] for m in h.nested], label=f"{name} {key[7:]}")
    ax_loss.set(xlabel="epoch", ylabel="MSE", yscale="log", title="behaviour cloning loss")
    ax_mult.set(xlabel="epoch", ylabel="multiplier", title="DeepNestedOptimizer LR multipliers")
    ax_loss.legend()
    ax_mult.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, History]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=64, help="demonstration episodes")
    parser.add_argument("--horizon", type=int, default=50, help="steps per episode")
    parser.add_argument("--noise", type=float, default=0.05, help="expert action noise (std)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=BC_CONFIG["lr"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("examples/out/behaviour_cloning.png"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = demonstrations(args.episodes, args.horizon, args.noise, args.seed)
    val = demonstrations(max(8, args.episodes // 4), args.horizon, args.noise, args.seed + 1)
    histories = {}
    for name in ("nested", "adam"):
        bc_config = {**BC_CONFIG, "lr": args.lr, "optimizer_type": name}
        histories[name] = train_policy(bc_config, data, val, args.epochs, args.batch_size,
                                       args.seed, label=name)
    plot(histories, args.out)
    print("final val MSE: " + ", ".join(f"{n} {h.val[-1]:.4f}" for n, h in histories.items())
          + f"; wrote {args.out}")
    return histories


if __name__ == "__main__":
    main()
