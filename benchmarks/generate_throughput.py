"""Prompt processing and decoding speed of each model type, at several context lengths.

For every config and context length: read a random prompt of that length (in pieces of
``--prefill-chunk`` tokens, carrying the state, so activations stay bounded), then decode
``--decode-tokens`` tokens one at a time from the state, greedily, exactly as
``nestlearn sample`` does. Reported: prompt tokens/s, decoding tokens/s (and ms per token), the
size of the state after the prompt (a Transformer's key/value cache grows with the context; a
memory's state does not) and the process's peak resident memory during decoding (Linux).
Weights are random: speed does not depend on them. All configs run in one process, one after
the other; the ratios to the first config at the same context are the figures to quote.

    python benchmarks/generate_throughput.py --quick
    python benchmarks/generate_throughput.py --configs transformer/pilot,hope/pilot,titans/pilot \
        --contexts 1024,8192,32768
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nestlearn.config import load_config
from nestlearn.generate import SamplingConfig, read_prompt, sample_ids
from nestlearn.models import LanguageModel, build
from nestlearn.utils.io import atomic_write_json
from nestlearn.utils.numerics import flush_subnormals

SMOKE = "transformer/pilot_smoke,hope/pilot_smoke,hope/pilot_smoke:model.type=hope_attention,titans/pilot_smoke"
VOCAB = 2048


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=SMOKE,
                   help="comma-separated config names, each optionally name:key=value[:key=value]")
    p.add_argument("--contexts", default="1024,8192,32768", help="prompt lengths, comma-separated")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="contexts 256,1024 and 16 decoded tokens")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/generate_throughput.json"))
    return p.parse_args(argv)


def state_bytes(state: Any) -> int:
    """Bytes of every tensor reachable from a model state (dataclasses, tuples, lists, dicts)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return sum(state_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, list | tuple):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_bytes(s) for s in state.values())
    return 0


def reset_peak_rss() -> None:
    """Start a new peak-resident-memory window (Linux: ``clear_refs`` 5 resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@torch.no_grad()
def measure(model: LanguageModel, context: int, args: argparse.Namespace) -> dict[str, Any]:
    ids = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    state = read_prompt(model, ids[:, :context - 1], args.prefill_chunk)
    prefill_s = time.perf_counter() - start
    size = state_bytes(state)
    reset_peak_rss()
    start = time.perf_counter()
    decoded = 0
    for _ in sample_ids(model, ids[:, -1:], SamplingConfig(max_new_tokens=args.decode_tokens, temperature=0),
                        state):
        decoded += 1
    decode_s = time.perf_counter() - start
    return {"context": context, "prefill_tok_s": (context - 1) / prefill_s, "decode_tok_s": decoded / decode_s,
            "decode_ms_per_token": 1000 * decode_s / decoded, "state_mb": size / 2**20,
            "decode_peak_rss_mb": peak_rss_mb()}


def load_named(spec: str, max_len: int) -> LanguageModel:
    """The config's model with random weights; its RoPE table covers ``max_len`` tokens."""
    name, *own = spec.split(":")
    cfg = load_config(name, [*own, f"model.vocab_size={VOCAB}", f"model.max_seq_len={max_len}"])
    torch.manual_seed(0)
    return build(cfg.model).eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.contexts, args.decode_tokens = "256,1024", 16
    flush_subnormals()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    for spec in args.configs.split(","):
        model = load_named(spec, max(contexts) + args.decode_tokens)
        measure(model, 64, argparse.Namespace(prefill_chunk=args.prefill_chunk, decode_tokens=4))  # warm-up
        for context in contexts:
            row = {"config": spec, **measure(model, context, args)}
            rows.append(row)
            print(f"{spec:<48} {context:>6} prompt {row['prefill_tok_s']:>8,.0f} tok/s   decode "
                  f"{row['decode_tok_s']:>7,.1f} tok/s ({row['decode_ms_per_token']:.1f} ms)   state "
                  f"{row['state_mb']:>8.2f} MB   peak {row['decode_peak_rss_mb'] or 0:,.0f} MB", flush=True)
    first = {r["context"]: r for r in rows if r["config"] == rows[0]["config"]}
    for r in rows:
        base = first[r["context"]]
        r["decode_vs_first"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_first"] = r["prefill_tok_s"] / base["prefill_tok_s"]
    print(f"\n{'config':<48} {'context':>7} {'prompt tok/s':>12} {'decode tok/s':>12} {'vs first':>8} "
          f"{'state MB':>9} {'peak MB':>8}")
    for r in rows:
        print(f"{r['config']:<48} {r['context']:>7} {r['prefill_tok_s']:>12,.0f} {r['decode_tok_s']:>12,.1f} "
              f"{r['decode_vs_first']:>8.2f} {r['state_mb']:>9.2f} {r['decode_peak_rss_mb'] or 0:>8,.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"threads": args.threads, "decode_tokens": args.decode_tokens,
                                 "torch": torch.__version__, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
