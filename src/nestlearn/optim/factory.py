"""Build the outer-loop optimizer and its learning-rate schedule from a config.

Only `adamw` exists for now; the deep optimizers of the Nested Learning paper register here
later. Parameters are split so that matrices decay and norms/biases/gains do not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlearn.config.schema import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices (dim >= 2) only: decaying gains and biases hurts and is unusual."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.type == "adamw":
        return torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            eps=cfg.eps,
        )
    raise ValueError(f"optimizer.type={cfg.type!r} is not known; expected adamw")


def lr_factor(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Linear warmup to 1, then cosine (or constant) decay to `min_lr_ratio` at `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(cfg: OptimizerConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg)
    )
