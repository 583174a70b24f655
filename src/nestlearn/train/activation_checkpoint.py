"""Activation checkpointing applied to a model from outside (`train.activation_checkpointing`).

Every block of `model.blocks` keeps only its inputs during the forward pass and recomputes its
activations in the backward pass: training memory then grows with the number of blocks times
one block's inputs instead of every intermediate of every block, at the cost of a second
forward. This is what makes long sequences (HOPE at 8192 tokens) fit on a small machine.

It uses torch's composable `checkpoint` (forward hooks on the module), so no model code changes
and parameter names (hence safetensors checkpoints) stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint each block of `model.blocks` (an `nn.ModuleList`); returns how many.

    Gradients are those of the plain model (the recomputation runs the same operations).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"train.activation_checkpointing needs a model with a non-empty "
                         f"`blocks` ModuleList; {type(model).__name__} has none")
    if getattr(model, "in_context", False):
        raise ValueError("train.activation_checkpointing does not support model.cms.in_context="
                         "true: in-context CMS levels differentiate inside the forward pass, "
                         "which a recomputing backward cannot replay")
    if not torch.distributed.is_available():
        raise RuntimeError("train.activation_checkpointing needs a torch build with "
                           "torch.distributed (its composable checkpoint API)")
    from torch.distributed._composable.checkpoint_activation import checkpoint

    for block in blocks:
        checkpoint(block)
    return len(blocks)
