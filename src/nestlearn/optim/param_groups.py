"""Split a model's parameters into core and memory groups, and read layer depth from names.

The nested optimizer gives the in-context memories (Titans memory, CMS, persistent tokens)
their own learned LR multiplier: they live on a different time scale from the core weights,
so one shared learning rate would be wrong for one of the two.
"""

from __future__ import annotations

import re

from torch import nn

MEMORY_MARKERS: frozenset[str] = frozenset({"memory", "mem", "cms", "persistent"})
"""Name tokens (split on "." and "_") that mark a memory parameter; "neural_memory" matches
through its "memory" token, while "embedding" or "element" do not match "mem"."""

_DEPTH_PATTERN = re.compile(r"(?:^|\.)(?:blocks|layers|layer|block|h)\.(\d+)(?:\.|$)")


def is_memory_param(name: str) -> bool:
    """True when a token of `name` is a memory marker (token match avoids "embed" → "mem")."""
    tokens = re.split(r"[._]", name.lower())
    return any(token in MEMORY_MARKERS or "memory" in token for token in tokens)


def group_titans_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Return `(core_params, memory_params)`: trainable parameters, each once, in model order.

    A parameter is a memory parameter when its qualified name has a memory marker token
    (see `MEMORY_MARKERS`); everything else (embeddings, attention, MLPs, norms, heads) is core.
    """
    core: list[nn.Parameter] = []
    memory: list[nn.Parameter] = []
    for name, param in model.named_parameters():  # named_parameters already drops duplicates
        if param.requires_grad:
            (memory if is_memory_param(name) else core).append(param)
    return core, memory


def infer_param_depth(name: str) -> int:
    """Layer index of a parameter from names like `blocks.3.attn.w` or `model.layers.3.mlp.b`.

    Returns -1 when the name has no numbered block (embeddings, final norm, LM head), so callers
    can tell "outside the stack" from "block 0".
    """
    match = _DEPTH_PATTERN.search(name)
    return int(match.group(1)) if match else -1
