"""Throughput of the Titans neural memory: chunk-wise parallel path vs per-token reference vs
causal softmax attention (SDPA) of the same width, and memory of token-by-token decoding.

    python benchmarks/memory_throughput.py            # dim 256, 4x64 heads, T 2048, decode 1k/4k/16k
    python benchmarks/memory_throughput.py --quick    # shorter reference run and decode lengths

Training rows time forward + backward (mean of squares as the loss) on random inputs, best of
``--repeats`` (``--ref-repeats`` for the reference) after one warm-up, the rows taking turns
so that a slow spell of the machine does not fall on one of them. The reference path is timed
on ``--ref-len`` tokens (it is linear in length). Decoding feeds one token at a time with the
state, under ``no_grad``, and samples the process RSS every 64 tokens: a flat peak over
lengths means O(1) state. ``memory_chunked_compiled`` is the chunk-wise path with
``compile=True`` (same weights; its first call, which compiles, is recorded as
``compiled_first_call_s`` and not timed; ``--no-compile`` skips it). ``memory_chunked_unbounded``
is the chunk-wise path without the write bound (``write_bound=False``): the bound's cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.memory import MemoryState, NeuralMemory, NeuralMemoryConfig
from nestlearn.utils.io import atomic_write_json
from nestlearn.utils.numerics import flush_subnormals


def at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of timed runs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ref-len", type=int, help="tokens for the reference path (default: --seq-len)")
    p.add_argument("--decode-lens", default="1024,4096,16384")
    p.add_argument("--repeats", type=at_least_one, default=3, help="timed runs of each fast row (best counts)")
    p.add_argument("--ref-repeats", type=at_least_one, default=3, help="timed runs of the reference row")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled row (compile=True)")
    p.add_argument("--quick", action="store_true", help="--ref-len 256, --decode-lens 256,1024,4096")
    p.add_argument("--out", default="benchmarks/results/memory_throughput.json")
    args = p.parse_args(argv)
    if args.quick:
        args.ref_len = args.ref_len or 256
        args.decode_lens = "256,1024,4096"
    args.ref_len = args.ref_len or args.seq_len
    return args


class CausalAttention(nn.Module):
    """Baseline: q/k/v projections, causal SDPA, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: Tensor = self.out(y.transpose(1, 2).reshape(b, t, d))
        return out


Case = tuple[Callable[[Tensor], Tensor], Tensor, int]


def time_train(cases: list[Case]) -> list[float]:
    """Best wall time of forward + backward of each case ``(fn, x, repeats)`` after one
    warm-up run. The cases take turns, one run each per round, so that a slow spell of the
    machine falls on all of them rather than on one. A non-finite loss stops the script."""
    best = [float("inf")] * len(cases)
    for i in range(max(reps for _, _, reps in cases) + 1):
        for c, (fn, x, reps) in enumerate(cases):
            if i > reps:
                continue
            start = time.perf_counter()
            loss = fn(x).square().mean()
            torch.autograd.backward(loss)
            seconds = time.perf_counter() - start
            if not torch.isfinite(loss):  # a diverging layer's speed means nothing
                raise SystemExit(f"case {c + 1}: non-finite loss in run {i + 1}; not timed")
            if i:
                best[c] = min(best[c], seconds)
    return best


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def decode(memory: NeuralMemory, length: int, dim: int) -> dict[str, float]:
    x = torch.randn(1, length, dim)
    state: MemoryState | None = None
    _, state = memory(x[:, :64], state)  # warm up allocator and state shapes
    base = peak = rss_bytes()
    start = time.perf_counter()
    for t in range(length):
        _, state = memory(x[:, t:t + 1], state)
        if t % 64 == 0:
            peak = max(peak, rss_bytes())
    seconds = time.perf_counter() - start
    state_bytes = sum(w.numel() * w.element_size() for w in (*state.weights.layers, *state.momentum.layers))
    return {"tokens": length, "tokens_per_s": length / seconds, "rss_delta_mb": (peak - base) / 2**20,
            "state_weights_mb": state_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flushed = flush_subnormals()  # before the thread pool starts (utils.numerics)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = NeuralMemoryConfig(d_model=args.dim, heads=args.heads, head_dim=args.dim // args.heads,
                             depth=args.depth, chunk_size=args.chunk)
    memory = NeuralMemory(cfg)
    attention = CausalAttention(args.dim, args.heads)
    x = torch.randn(args.batch, args.seq_len, args.dim)
    x_ref = x[:, :args.ref_len]

    unbounded = NeuralMemory(replace(cfg, write_bound=False))  # the paper's write, no bound
    unbounded.load_state_dict(memory.state_dict())
    cases: dict[str, Case] = {
        "memory_chunked": (lambda z: memory(z)[0], x, args.repeats),
        "memory_chunked_unbounded": (lambda z: unbounded(z)[0], x, args.repeats),
        "memory_reference": (memory.forward_reference, x_ref, args.ref_repeats),
        "attention_sdpa": (attention, x, args.repeats),
    }
    first_call_s = None
    if not args.no_compile:
        compiled = NeuralMemory(replace(cfg, compile=True))
        compiled.load_state_dict(memory.state_dict())
        start = time.perf_counter()
        compiled(x)[0].square().mean().backward()
        first_call_s = time.perf_counter() - start
        print(f"  compiled first call (compiles) {first_call_s:.1f} s", file=sys.stderr)
        cases["memory_chunked_compiled"] = (lambda z: compiled(z)[0], x, args.repeats)
    rows: list[dict[str, Any]] = []
    for (name, (_, inp, _)), seconds in zip(cases.items(), time_train(list(cases.values())), strict=True):
        rows.append({"path": name, "tokens": inp.shape[0] * inp.shape[1], "seconds": seconds,
                     "tokens_per_s": inp.shape[0] * inp.shape[1] / seconds})
        print(f"  {name:24s} {rows[-1]['tokens_per_s']:10.0f} tok/s", file=sys.stderr)
    speed = {r["path"]: r["tokens_per_s"] for r in rows}
    fast, ref, attn = speed["memory_chunked"], speed["memory_reference"], speed["attention_sdpa"]
    fast_compiled = speed.get("memory_chunked_compiled")
    decode_rows = [decode(memory, int(n), args.dim) for n in args.decode_lens.split(",")]

    print(f"\nTitans memory, dim {args.dim}, {args.heads} heads, depth {args.depth}, chunk {args.chunk}, "
          f"batch {args.batch}, T {args.seq_len}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'path (fwd+bwd)':24s} {'tokens':>8s} {'seconds':>9s} {'tok/s':>10s}")
    for r in rows:
        print(f"{r['path']:24s} {r['tokens']:8d} {r['seconds']:9.3f} {r['tokens_per_s']:10.0f}")
    print(f"speed-up chunked / reference: {fast / ref:.1f}x; chunked / attention: {fast / attn:.2f}x; "
          f"bounded / unbounded: {fast / speed['memory_chunked_unbounded']:.2f}x")
    if fast_compiled is not None:
        print(f"speed-up chunked compiled / reference: {fast_compiled / ref:.1f}x; "
              f"compiled / eager chunked: {fast_compiled / fast:.2f}x")
    print(f"\n{'decode tokens':>14s} {'tok/s':>8s} {'peak RSS delta MB':>18s} {'M+S state MB':>13s}")
    for d in decode_rows:
        print(f"{d['tokens']:14d} {d['tokens_per_s']:8.0f} {d['rss_delta_mb']:18.1f} {d['state_weights_mb']:13.2f}")
    atomic_write_json(args.out, {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__, "load_average": os.getloadavg(), "flush_subnormals": flushed,
        "train": rows, "speedup_vs_reference": fast / ref, "speedup_vs_attention": fast / attn,
        "bounded_vs_unbounded": fast / speed["memory_chunked_unbounded"],
        "compiled_speedup_vs_reference": None if fast_compiled is None else fast_compiled / ref,
        "compiled_first_call_s": first_call_s, "decode": decode_rows,
    })
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
