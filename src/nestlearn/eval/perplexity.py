"""Validation loss, perplexity and bits per byte of a language model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.utils.device import autocast_context


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in float32 whatever the autocast."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def evaluate_lm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                bytes_per_token: float, device: torch.device,
                precision: str = "fp32") -> dict[str, float]:
    """Token-weighted mean loss over `batches`; bits per byte uses the split's bytes/token.

    bpb = (loss in nats / ln 2) / (UTF-8 bytes per token): comparable across tokenizers.
    """
    return lm_figures(*summed_nats(model, batches, device, precision), bytes_per_token)


@torch.no_grad()
def summed_nats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                device: torch.device, precision: str = "fp32",
                rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
                idle_forward: bool = False) -> tuple[float, int]:
    """Summed next-token loss (nats) and token count over `batches`, in eval mode.

    `rows` cuts each batch to this process's share under data parallelism (the caller reduces
    the sums). With `idle_forward` a process whose share is empty still runs one uncounted row,
    because a sharded model's forward is a collective every process must join.
    """
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    try:
        for x, y in batches:
            mine_x, mine_y = (rows(x), rows(y)) if rows is not None else (x, y)
            if len(mine_x):
                nats, tokens = batch_nats(model, mine_x, mine_y, device, precision)
                total_nats, total_tokens = total_nats + nats, total_tokens + tokens
            elif idle_forward:
                batch_nats(model, x[:1], y[:1], device, precision)
    finally:
        model.train(was_training)
    return total_nats, total_tokens


@torch.no_grad()
def batch_nats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
               precision: str = "fp32") -> tuple[float, int]:
    """Summed next-token loss (nats) of one batch and its token count."""
    x, y = x.to(device), y.to(device)
    with autocast_context(device, precision):
        logits, _ = model(x)
    return float(lm_loss(logits, y)) * y.numel(), y.numel()


def lm_figures(total_nats: float, total_tokens: float, bytes_per_token: float) -> dict[str, float]:
    """Loss, perplexity and bits per byte from summed nats and tokens."""
    if total_tokens == 0:
        raise ValueError("evaluation got no batches: the validation split is empty or too short")
    loss = total_nats / total_tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss / math.log(2) / bytes_per_token,
        "val_tokens": float(total_tokens),
    }
