"""The long-context stability probe: its variants load the same weights and change only the
named switch, and it reports every self-referential block's memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conftest import load_script
from nestlearn import models
from nestlearn.config import load_config
from nestlearn.loading import LoadedModel


def test_variants_and_trace_of_a_small_hope_model() -> None:
    bench = load_script("benchmarks/long_context_stability.py")
    cfg = load_config("hope/pilot_smoke", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
                                           "model.n_heads=2", "model.self_ref.memory_chunk_size=4",
                                           "model.self_ref.other_chunk_size=4"])
    torch.manual_seed(0)
    loaded = LoadedModel(models.build(cfg.model), tokenizer=None, config=cfg, checkpoint=Path("."))  # type: ignore[arg-type]
    ids = torch.randint(0, 64, (1, 10))
    for name, change in bench.VARIANTS.items():
        model = bench.variant_model(loaded, change, torch.float64)
        rows: list[dict[str, Any]] = bench.trace(model, ids, piece=4)
        assert [r["tokens"] for r in rows] == [4, 8, 10], name
        assert all(r["finite"] and len(r["memory_max"]) == 2 for r in rows), name
        params = dict(model.named_parameters())
        assert torch.equal(params["blocks.0.self_ref.memory_init.0"].float(),
                           dict(loaded.model.named_parameters())["blocks.0.self_ref.memory_init.0"])
        beta = torch.sigmoid(params["blocks.0.self_ref.momentum_logit"])
        assert (beta.max() < 1e-12) == ("beta" in name), name
