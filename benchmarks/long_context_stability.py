"""Does a trained model's in-context memory stay bounded past its training length?

Feeds held-out files of the default corpus (the validation split `nestlearn prepare` makes),
each as one stream from the end-of-sequence token on, in pieces of ``--piece`` tokens carrying
the state, and reports after each piece the largest |weight| of every self-referential block's
M_memory and whether the logits are finite. Variants run the same trained weights with one
switch changed (momentum off, other chunk sizes, float64), to tell which part of the model a
growth needs.

    python benchmarks/long_context_stability.py runs/quality/final_hope_s0 --files 74
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch

from nestlearn import models
from nestlearn.data.corpus import open_source, split_of
from nestlearn.loading import LoadedModel, load
from nestlearn.memory.self_ref import SelfRefState
from nestlearn.models.base import LanguageModel
from nestlearn.utils.io import atomic_write_json

VARIANTS: dict[str, dict[str, Any]] = {
    "as trained": {},
    "curvature step off (g = 1)": {"curvature_step": False},
    "curvature step on": {"curvature_step": True},
    "momentum off (beta = 0)": {"beta_zero": True},
    "memory chunks 8": {"memory_chunk_size": 8, "other_chunk_size": 8},
    "chunks 1 (per-token recurrence)": {"memory_chunk_size": 1, "other_chunk_size": 1},
    "chunks 1, curvature step on": {"memory_chunk_size": 1, "other_chunk_size": 1, "curvature_step": True},
}


def variant_model(loaded: LoadedModel, change: dict[str, Any], dtype: torch.dtype) -> LanguageModel:
    """The loaded weights in a model with ``change`` applied to ``model.self_ref`` (eager)."""
    change = dict(change)
    beta_zero = change.pop("beta_zero", False)
    cfg = loaded.config.model
    cfg = dataclasses.replace(cfg, self_ref=dataclasses.replace(cfg.self_ref, compile=False, **change))
    model = models.build(cfg)
    model.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        if beta_zero:
            for name, p in model.named_parameters():
                if name.endswith("momentum_logit"):
                    p.fill_(-30.0)  # σ(-30) ≈ 1e-13
    return model.to(dtype).eval()


def memory_max(state: Any) -> list[float]:
    """max |W| of M_memory in every self-referential block of a model state."""
    out = []
    for layer in getattr(state, "layers", []):
        sr = getattr(layer, "self_ref", None)
        if isinstance(sr, SelfRefState):
            out.append(max(float(w.abs().max()) for w in sr.memory.weights.layers))
    return out


@torch.no_grad()
def trace(model: LanguageModel, ids: torch.Tensor, piece: int) -> list[dict[str, Any]]:
    rows, state = [], None
    for lo in range(0, ids.shape[1], piece):
        logits, state = model(ids[:, lo:lo + piece], state)
        rows.append({"tokens": min(lo + piece, ids.shape[1]), "finite": bool(torch.isfinite(logits).all()),
                     "memory_max": memory_max(state)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory or checkpoint")
    p.add_argument("--files", default="74", help="indices of held-out files (comma-separated), in corpus order")
    p.add_argument("--chars", type=int, default=4000, help="the first characters of each file")
    p.add_argument("--piece", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/long_context_stability.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load(args.run)
    val = [d for d in open_source("stdlib").documents()
           if split_of(d.doc_id, loaded.config.data.val_fraction) == "val"]
    dtype = getattr(torch, args.dtype)
    results = []
    for index in (int(i) for i in args.files.split(",")):
        doc = val[index]
        ids = torch.tensor([[loaded.tokenizer.eos_id, *loaded.tokenizer.encode(doc.text[:args.chars])]])
        print(f"{doc.doc_id}: {ids.shape[1]} tokens (trained on {loaded.config.train.seq_len})")
        for name, change in VARIANTS.items():
            rows = trace(variant_model(loaded, change, dtype), ids, args.piece)
            peaks = [max(r["memory_max"]) if r["memory_max"] and not any(map(math.isnan, r["memory_max"]))
                     else math.nan for r in rows]
            shown = " / ".join(f"{x:.3g}" for x in peaks)
            bad = next((r["tokens"] for r in rows if not r["finite"]), None)
            print(f"  {name:<34} max |W| after each {args.piece}: {shown}"
                  f"{'' if bad is None else f'   non-finite logits by token {bad}'}", flush=True)
            results.append({"file": doc.doc_id, "variant": name, "rows": rows})
    atomic_write_json(args.out, {"run": str(args.run), "dtype": args.dtype, "piece": args.piece,
                                 "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
