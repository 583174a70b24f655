"""The sharded checkpoint layout: each rank of an FSDP2 job writes its own shards, none gathers.

In a checkpoint directory (`parallel.sharded_checkpoints`), rank r writes
`model-rank{r}.safetensors` (its rows of every sharded tensor; rank 0 also the unsharded ones),
`optimizer-rank{r}.pt` (its optimizer state, scheduler and pending gradients with local rows;
tensors and numbers only, loaded with `weights_only=True`) and `shards-rank{r}.json` (which rows
of which tensor it holds, and which tensor names are another's alias, e.g. a tied head). Rank 0
writes the rest as in the consolidated layout, and a manifest with every file's checksum.

Reading assembles the state in the consolidated layout (whole tensors, the optimizer state
keyed as one process keys it), so every loader, at any world size and under any strategy, reads
either layout the same way. Only JSON, safetensors and `weights_only` loads are involved: unlike
`torch.distributed.checkpoint`, whose metadata is a pickle, nothing here can run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from nestlearn.utils.io import read_json

LAYOUT = "sharded"


def model_file(rank: int) -> str:
    return f"model-rank{rank:05d}.safetensors"


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank:05d}.pt"


def index_file(rank: int) -> str:
    return f"shards-rank{rank:05d}.json"


def rank_files(world_size: int) -> list[str]:
    return [name for r in range(world_size) for name in (model_file(r), optimizer_file(r), index_file(r))]


def read_sharded_model(path: Path, world_size: int) -> dict[str, torch.Tensor]:
    """The whole model state of a sharded checkpoint, every name (aliases included)."""
    indexes = [read_json(path / index_file(r)) for r in range(world_size)]
    pieces = [load_file(str(path / model_file(r))) for r in range(world_size)]
    model = assemble(pieces, [ix["model"] for ix in indexes], path)
    for alias, name in indexes[0]["aliases"].items():
        model[alias] = model[name]
    return model


def read_sharded_blob(path: Path, world_size: int) -> dict[str, Any]:
    """The optimizer file's blob ({"optimizer", "scheduler", "extra"}) in the consolidated layout."""
    indexes = [read_json(path / index_file(r)) for r in range(world_size)]
    blobs = [torch.load(path / optimizer_file(r), map_location="cpu", weights_only=True) for r in range(world_size)]
    whole = assemble([flatten(b) for b in blobs], [ix["blob"] for ix in indexes], path)
    return unflatten(blobs[0], whole)


def assemble(pieces: list[dict[str, Any]], rows: list[dict[str, list[int]]], path: Path) -> dict[str, Any]:
    """Rank 0's entries, with every sharded one replaced by its ranks' rows concatenated in order."""
    out = dict(pieces[0])
    for name in rows[0]:
        parts = sorted(((ix[name], p[name]) for ix, p in zip(rows, pieces, strict=True)), key=lambda t: t[0][0])
        if [a for (a, _), _ in parts][1:] != [b for (_, b), _ in parts][:-1]:
            raise ValueError(f"checkpoint {path}: the shards of {name} do not tile its rows")
        out[name] = torch.cat([t for _, t in parts], dim=0)
    return out


def flatten(blob: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (the optimizer file's blob) as one dict of dotted keys to leaves."""
    flat: dict[str, Any] = {}
    for key, value in blob.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(template: dict[str, Any], flat: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`template`'s nesting with its leaves taken from `flat` (the inverse of `flatten`; leaves
    missing from `flat` are left out)."""
    out: dict[str, Any] = {}
    for key, value in template.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = unflatten(value, flat, f"{name}.")
        elif name in flat:  # a rank other than 0 leaves out what rank 0 holds for all
            out[key] = flat[name]
    return out
