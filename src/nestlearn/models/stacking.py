"""Ad-hoc level stacking: a Hope-Attention model grown from a trained Transformer++.

Nested Learning (arXiv 2512.24695 §7.3): since every CMS level has its own context and update
rule, its initial state can be set independently, e.g. from a pre-trained model's MLP blocks,
MLP^(f_i)_0 = MLP_pre-trained. Here every level of layer i starts as a copy of layer i's
Transformer MLP (its pre-norm gain included), and the attention, embeddings and norms are the
Transformer's. With one level (and, in context, η -> 0) the stacked model computes exactly what
the Transformer did; more levels in the ``independent`` form (1/k-weighted sum of k copies)
also start at the Transformer's function, in the chain forms they apply the MLP k times.
`freeze_backbone` then freezes the copied backbone so that fine-tuning only moves the levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.models.hope import HopeLM
from nestlearn.models.registry import build

TRANSFORMER_TYPES = ("transformer", "transformer++")


def _source_name(name: str) -> str | None:
    """The Transformer++ tensor a HopeLM tensor is copied from (None: a part stacking adds).

    ``blocks.i.cms.blocks.j.norm`` / ``.mlp`` <- ``blocks.i.mlp_norm`` / ``blocks.i.mlp``;
    embeddings, attention, its norm, the final norm and the head keep their names.
    """
    parts = name.split(".")
    if parts[0] != "blocks" or parts[2] != "cms":
        return name
    if parts[3] != "blocks":
        return None  # the independent form's aggregation weights
    rest = parts[5:]
    if rest[0] == "norm":
        return ".".join(["blocks", parts[1], "mlp_norm", *rest[1:]])
    return ".".join(["blocks", parts[1], *rest])


def stack_levels(source: dict[str, torch.Tensor], cfg: ModelConfig) -> HopeLM:
    """Build the ``hope_attention`` model of `cfg` from a Transformer++'s tensors ``source``
    (``nestlearn.loading.stack_levels_from_transformer`` reads them from a checkpoint). Strict:
    every tensor of the model except the aggregation weights must have a source of the same
    shape, and every source tensor must be used (a tied head may come under either name);
    a ``ValueError`` lists what does not fit."""
    if cfg.type != "hope_attention":
        raise ValueError(f"level stacking builds a hope_attention model, not '{cfg.type}'")
    if cfg.tie_embeddings and "lm_head.weight" in source:  # save_model keeps one tied name
        source = {**source, "embed.weight": source.get("embed.weight", source["lm_head.weight"])}
    model = build(cfg)
    assert isinstance(model, HopeLM)
    state = model.state_dict()
    used: set[str] = set()
    problems: list[str] = []
    loaded: dict[str, torch.Tensor] = {}
    for name, target in state.items():
        src = _source_name(name)
        if src is None:
            loaded[name] = target
            continue
        if src == "lm_head.weight" and cfg.tie_embeddings:
            src = "embed.weight"
        tensor = source.get(src)
        if tensor is None:
            problems.append(f"missing {src} (for {name})")
        elif tensor.shape != target.shape:
            problems.append(f"{src} has shape {tuple(tensor.shape)}, {name} needs {tuple(target.shape)}")
        else:
            loaded[name] = tensor.to(target.dtype)
            used.add(src)
    unused = sorted(set(source) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    problems += [f"unexpected {name}" for name in unused]
    if problems:
        raise ValueError("does not fit the stacked model: " + "; ".join(problems[:8]))
    model.load_state_dict(loaded, strict=True)
    return model


def freeze_backbone(model: HopeLM, frozen_levels: Sequence[int] = ()) -> list[nn.Parameter]:
    """Freeze what stacking copied except the CMS levels; return the parameters left to train.

    Embeddings, attention, norms and head stop receiving gradients (``requires_grad=False``), as
    do the CMS levels whose indices are in `frozen_levels` (e.g. the slowest, kept as the
    pre-trained MLP). `model.levels()` then lists only trainable parameters, so
    `setup_optimizers` fine-tunes just the levels at their frequencies.
    """
    keep: set[int] = set()
    for block in model.hope_blocks():
        if block.cms.agg is not None:
            keep.add(id(block.cms.agg))
        for i, level in enumerate(block.cms.level_modules()):
            if i not in frozen_levels:
                keep.update(id(p) for p in level.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]
