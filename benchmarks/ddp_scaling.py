"""Data-parallel training on this machine, and FSDP2's memory per rank at the paper's scales.

Part 1, throughput: each config is trained for `--steps` steps on the same global batch by one
process with `--threads` threads, then by `--threads` torchrun processes of one thread each under
DDP and under FSDP2 (gloo on CPU, NCCL on GPUs: `--device cuda` gives each rank a GPU). The table
gives tokens/s and its ratio to one process; each run's training loss must be finite and fall
(the speed of a run that does not learn means nothing), else the script exits 1. On a 2-core
CPU two processes of one thread cannot beat one process of two: the figure is for the record;
the script is what GPU users run.

Part 2, memory: per rank of hope/mid and hope/target under FSDP2 on `--world` GPUs, before a
launch: parameters, gradients and AdamW state (fp32, sharded by the world size), the all-gathered
weights of the largest FSDP unit (current and prefetched) with its unsharded gradients, and
activations: the bytes autograd saves, measured on one block of the config at `--probe-tokens`
tokens (bf16 autocast as configured) and scaled to the config's tokens per rank and layers, and
the total with `train.activation_checkpointing` (block inputs kept, one block recomputed at a
time). An estimate: allocator slack, communication buffers and fragmentation come on top.

    python benchmarks/ddp_scaling.py
    python benchmarks/ddp_scaling.py --configs hope/pilot --steps 20 --device cuda --threads 8
    python benchmarks/ddp_scaling.py --skip-throughput --world 16
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nestlearn import models
from nestlearn.config import load_config
from nestlearn.train.metrics import read_jsonl
from nestlearn.utils.device import autocast_context
from nestlearn.utils.io import atomic_write_json, read_json

GIB = 2 ** 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="transformer/pilot_smoke,hope/pilot_smoke")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="threads of the one process = processes launched")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    p.add_argument("--memory-configs", default="hope/mid,hope/target")
    p.add_argument("--world", type=int, default=8, help="GPUs of the FSDP2 memory estimate")
    p.add_argument("--probe-tokens", type=int, default=512, help="tokens of the activation probe")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json", default="benchmarks/results/ddp_scaling.json")
    return p.parse_args(argv)


# ---- part 1: throughput -------------------------------------------------------------------

def train_once(config: str, strategy: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One run through the CLI (torchrun for DDP/FSDP); its tokens/s and first/last losses."""
    name = f"{config.replace('/', '_')}_{strategy}"
    overrides = [f"name={name}", f"out_dir={out}", f"train.steps={args.steps}", f"train.device={args.device}",
                 f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", "train.eval_batches=4",
                 "train.log_every=1", "logging.progress=none", f"parallel.strategy={strategy}"]
    if strategy == "none":
        command = [sys.executable, "-m", "nestlearn", "train", "-c", config, f"train.threads={args.threads}"]
        env = dict(os.environ)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.threads}", "--standalone",
                   "-m", "nestlearn", "train", "-c", config, "train.threads=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *overrides, "--resume", "none"], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    final = read_json(out / name / "metrics.json")
    losses = [r["loss"] for r in read_jsonl(out / name / "metrics.jsonl") if r["split"] == "train"]
    head, tail = losses[:5], losses[-5:]
    learns = all(map(math.isfinite, losses)) and sum(tail) / len(tail) < sum(head) / len(head)
    return {"config": config, "strategy": strategy, "processes": 1 if strategy == "none" else args.threads,
            "tokens_per_s": final["tokens_per_s"], "first_loss": losses[0], "last_loss": losses[-1],
            "val_loss": final["val_loss"], "learns": learns}


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        for config in args.configs.split(","):
            base = None
            for strategy in ("none", "ddp", "fsdp"):
                row = train_once(config, strategy, args, Path(tmp))
                base = base or row["tokens_per_s"]
                row["vs_one_process"] = row["tokens_per_s"] / base
                rows.append(row)
                print(f"{config:<26} {strategy:<5} x{row['processes']}  {row['tokens_per_s']:>9,.0f} tok/s  "
                      f"{row['vs_one_process']:>5.2f}x  loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
                      f"{'' if row['learns'] else '  NOT LEARNING'}", flush=True)
    return rows


# ---- part 2: memory per rank --------------------------------------------------------------

def saved_bytes(run: Any) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def _probe_activations(cfg: Any, tokens: int) -> tuple[float, float]:
    """(bytes one block saves, bytes the rest saves) for one sequence of `tokens` tokens."""
    saved = []
    for layers in (1, 2):
        torch.manual_seed(0)
        probe = models.build(dataclasses.replace(cfg.model, n_layers=layers))
        ids = torch.randint(0, cfg.model.vocab_size, (1, tokens))

        def step(model: torch.nn.Module = probe, ids: torch.Tensor = ids) -> None:
            with autocast_context(torch.device("cpu"), cfg.train.precision):
                logits, _ = model(ids)
            logits.float().logsumexp(-1).mean().backward()

        saved.append(saved_bytes(step))
    per_layer = saved[1] - saved[0]
    return per_layer, saved[0] - per_layer


def memory_estimate(config: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(config, [])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size))
    with torch.device("meta"):
        model = models.build(cfg.model)
    params = model.num_params()
    units = model.fsdp_units()
    unit_params = max((sum(p.numel() for p in u.parameters()) for u in units), default=params)
    root_params = params - sum(sum(p.numel() for p in u.parameters()) for u in units)
    largest = max(unit_params, root_params)
    # activations: the bytes saved for backward by a 1- and a 2-block model of the config (real
    # weights, its autocast): their difference is one block's, the rest the embedding and head's
    per_layer, rest = _probe_activations(cfg, args.probe_tokens)
    per_rank_tokens = max(1, cfg.train.batch_size // args.world) * cfg.train.seq_len
    scale = per_rank_tokens / args.probe_tokens
    activations = (per_layer * cfg.model.n_layers + rest) * scale
    # train.activation_checkpointing: each block keeps its input; one block's activations exist
    # at a time, while backward recomputes it
    checkpointed = (per_layer + rest) * scale + cfg.model.n_layers * per_rank_tokens * cfg.model.d_model * 4
    fp32 = 4
    figures = {
        "parameters": params * fp32 / args.world,
        "gradients": params * fp32 / args.world,
        "adamw_state": 2 * params * fp32 / args.world,
        "gathered_unit": 3 * largest * fp32,  # current + prefetched weights, unsharded gradients
        "activations": activations,
    }
    state = sum(v for k, v in figures.items() if k != "activations")
    return {"config": config, "world": args.world, "params": params, "largest_unit_params": largest,
            "tokens_per_rank": per_rank_tokens, "precision": cfg.train.precision,
            "probe_saved_bytes_per_token_layer": per_layer / args.probe_tokens,
            "gib": {k: v / GIB for k, v in figures.items()}, "total_gib": sum(figures.values()) / GIB,
            "total_gib_activation_checkpointing": (state + checkpointed) / GIB}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [] if args.skip_throughput else throughput(args)
    memory = []
    for config in args.memory_configs.split(","):
        est = memory_estimate(config, args)
        memory.append(est)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in est["gib"].items())
        print(f"{config}: {est['params'] / 1e6:,.0f}M parameters, FSDP2 on {args.world} GPUs, "
              f"{est['tokens_per_rank']:,} tokens per rank: {est['total_gib']:.1f} GiB per rank ({parts}); "
              f"{est['total_gib_activation_checkpointing']:.1f} GiB with train.activation_checkpointing=true")
    atomic_write_json(Path(args.json), {"throughput": rows, "memory": memory, "settings": vars(args)})
    print(f"wrote {args.json}")
    return 0 if all(r["learns"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
