"""Throughput of self-referential Titans (``nestlearn.memory.SelfRefTitans``): the chunk-wise fast
path vs the per-token reference, forward + backward through the in-context updates.

    python benchmarks/self_ref_throughput.py                # dim 256, 4x64 heads, chunk 64, B 2, T 2048
    python benchmarks/self_ref_throughput.py --threads 2    # both cores

Rows time forward + backward (mean of squares as the loss, gradients into every outer
parameter and the input) on random inputs, best of ``--repeats`` after one warm-up. The
reference is timed on ``--ref-len`` tokens (it is linear in length) with the same chunk sizes.
``fast_compiled`` is the fast path with ``compile=True`` (same weights; its first call, which
compiles, is recorded as ``first_call_s`` and not timed). Ablation rows (momentum off, DGD off,
both) use the fast path. The machine is shared, so the JSON records the load average.
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
from torch import Tensor

from nestlearn.memory.self_ref import SelfRefTitans, SelfRefTitansConfig
from nestlearn.memory.self_ref_reference import reference_self_ref
from nestlearn.utils.io import atomic_write_json
from nestlearn.utils.numerics import flush_subnormals

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_throughput import at_least_one, time_train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--expansion", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=64, help="memory chunk size")
    p.add_argument("--other-chunk", type=int, help="chunk size of M_k, M_v, M_eta, M_alpha (default --chunk)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ref-len", type=int, default=128)
    p.add_argument("--repeats", type=at_least_one, default=3, help="timed runs of each fast row (best counts)")
    p.add_argument("--ref-repeats", type=at_least_one, default=2, help="timed runs of the reference row")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled row (compile=True)")
    p.add_argument("--out", default="benchmarks/results/self_ref_throughput.json")
    return p.parse_args(argv)


def run_layer(layer: SelfRefTitans) -> Callable[[Tensor], Tensor]:
    return lambda z: layer(z)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flushed = flush_subnormals()  # before the thread pool starts (utils.numerics)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # v_norm as `hope` runs it (model.self_ref.v_norm): without it the self-generated targets
    # overflow on unit-variance inputs within a few hundred tokens and the timing would be of NaNs.
    base = SelfRefTitansConfig(d_model=args.dim, heads=args.heads, head_dim=args.dim // args.heads,
                               depth=args.depth, expansion=args.expansion, memory_chunk_size=args.chunk,
                               other_chunk_size=args.other_chunk or args.chunk, v_norm=True)
    layer = SelfRefTitans(base)
    x = torch.randn(args.batch, args.seq_len, args.dim, requires_grad=True)
    x_ref = x[:, :args.ref_len].detach().requires_grad_()

    cases: list[tuple[str, Callable[[Tensor], Tensor], Tensor, int]] = [
        ("fast", run_layer(layer), x, args.repeats),
        ("reference", lambda z: reference_self_ref(layer, z), x_ref, args.ref_repeats),
    ]
    if not args.no_compile:  # the same weights, each full chunk through torch.compile
        compiled = SelfRefTitans(replace(base, compile=True))
        compiled.load_state_dict(layer.state_dict())
        cases.insert(1, ("fast_compiled", run_layer(compiled), x, args.repeats))
    if not args.no_ablations:
        for name, momentum, dgd in (("fast_no_momentum", False, True), ("fast_no_dgd", True, False),
                                    ("fast_no_momentum_no_dgd", False, False)):
            ablated = SelfRefTitans(replace(base, momentum=momentum, dgd=dgd))
            cases.append((name, run_layer(ablated), x, args.repeats))
    first_calls: list[float] = []
    for name, fn, inp, _ in cases:
        start = time.perf_counter()  # the first call compiles the compiled row's chunk step
        if not torch.isfinite(fn(inp)).all():  # with grad: the reference differentiates inside
            raise SystemExit(f"{name}: the layer's output is not finite on these inputs")
        first_calls.append(time.perf_counter() - start)
    rows: list[dict[str, Any]] = []
    best = time_train([(fn, inp, reps) for _, fn, inp, reps in cases])
    for (name, _, inp, _), seconds, first_call in zip(cases, best, first_calls, strict=True):
        rows.append({"path": name, "tokens": inp.shape[0] * inp.shape[1], "seconds": seconds,
                     "tokens_per_s": inp.shape[0] * inp.shape[1] / seconds, "first_call_s": first_call})
        print(f"  {name:24s} {rows[-1]['tokens_per_s']:10.0f} tok/s", file=sys.stderr)
    by_path = {r["path"]: r["tokens_per_s"] for r in rows}
    speedup = by_path["fast"] / by_path["reference"]
    compile_speedup = by_path["fast_compiled"] / by_path["fast"] if "fast_compiled" in by_path else None

    print(f"\nSelf-referential Titans, dim {args.dim}, {args.heads} heads, depth {args.depth}, expansion "
          f"{args.expansion}, chunks {base.memory_chunk_size}/{base.other_chunk_size} (memory/other), "
          f"batch {args.batch}, T {args.seq_len}, {args.threads} thread(s), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'path (fwd+bwd)':26s} {'tokens':>8s} {'seconds':>9s} {'tok/s':>10s}")
    for r in rows:
        print(f"{r['path']:26s} {r['tokens']:8d} {r['seconds']:9.3f} {r['tokens_per_s']:10.0f}")
    print(f"speed-up fast / reference: {speedup:.1f}x")
    if compile_speedup is not None:
        print(f"speed-up compiled / fast: {compile_speedup:.2f}x (first call, compiling: "
              f"{next(r['first_call_s'] for r in rows if r['path'] == 'fast_compiled'):.0f} s)")
    atomic_write_json(args.out, {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__, "load_average": os.getloadavg(), "flush_subnormals": flushed,
        "train": rows, "speedup_vs_reference": speedup,
        "speedup_compiled_vs_fast": compile_speedup,
    })
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
