"""Outer-loop optimizers and schedules (the deep optimizers of Nested Learning join here)."""

from nestlearn.optim.factory import build_optimizer, build_scheduler, lr_factor, param_groups

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups"]
