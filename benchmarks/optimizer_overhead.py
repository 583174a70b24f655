"""Step-time overhead of each optimizer relative to `torch.optim.AdamW`.

Every optimizer gets its own copy of the same Transformer++ (`--config`, default
`transformer/pilot_smoke`) and the same random token batches. One repetition runs one full
training step (forward + backward + clipping + optimizer step, as the Trainer does) for every
optimizer in a rotated order, so machine noise hits all of them alike; the overhead is the
median over repetitions of each step's time over the AdamW step of the same repetition.
Subnormal floats are flushed to zero (where the CPU supports it), so that a model an
optimizer drives to extreme values is not timed on the CPU's subnormal slow path.

The nested optimizer is timed in its steady state: its warm-up includes one real meta-update
(so the momentum MLP's output layer is no longer the zero it starts at, which would let the
hidden path be skipped). Meta-update cost is measured separately and amortised over
`meta_update_freq` steps in the "amortised" column; the explicit-mode meta-update (a k-step
unroll with double backward) is timed on `--meta-batch-size` sequences, so its amortised
figure is a lower bound for full-batch meta-updates.

    python benchmarks/optimizer_overhead.py --threads 1,2 --reps 12
    python benchmarks/optimizer_overhead.py --config transformer/pilot --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nestlearn.config import RunConfig, load_config
from nestlearn.eval.perplexity import lm_loss
from nestlearn.models import build
from nestlearn.optim import DeepNestedOptimizer, build_optimizer
from nestlearn.utils.io import atomic_write_json
from nestlearn.utils.numerics import flush_subnormals
from nestlearn.utils.seeding import seed_everything

BASELINE = "torch_adamw"
# optimizer name → (optimizer.type, nested mode or None, overhead target vs AdamW or None)
Kind = Literal["adamw", "nested", "dmgd", "delta_momentum", "m3"]
Mode = Literal["simple", "explicit"]
OPTIMIZERS: dict[str, tuple[Kind, Mode | None, float | None]] = {
    "adamw": ("adamw", None, None),
    "delta_momentum": ("delta_momentum", None, 1.5),
    "dmgd": ("dmgd", None, 1.5),
    "m3": ("m3", None, 1.5),
    "nested_simple": ("nested", "simple", 1.25),
    "nested_explicit": ("nested", "explicit", None),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="transformer/pilot_smoke")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    p.add_argument("--seq-len", type=int, help="default: the config's train.seq_len")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions (one step each)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (>= 2)")
    p.add_argument("--meta-batch-size", type=int, default=2,
                   help="sequences in the timed explicit-mode meta-update (its k-step unroll "
                        "with double backward is far slower than a step)")
    p.add_argument("--threads", default="1,2",
                   help="comma-separated torch intra-op thread counts, measured one after another")
    p.add_argument("--only", default="", help="comma-separated subset of optimizers")
    p.add_argument("--out", default="benchmarks/results/optimizer_overhead.json")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    if args.reps < 1 or args.warmup < 2 or not args.threads or min(args.threads) < 1:
        p.error("--reps must be >= 1, --warmup >= 2 and --threads counts >= 1")
    return args


@dataclasses.dataclass
class Runner:
    """One optimizer on its own model copy; `step` is one timed training step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = dataclasses.field(default_factory=list)
    meta_s: float | None = None  # one meta-update, seconds (nested optimizers only)
    meta_every: int | None = None

    def step(self, ids: Tensor) -> float:
        start = time.perf_counter()
        logits, _ = self.model(ids[:, :-1])
        loss = lm_loss(logits, ids[:, 1:])
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        if isinstance(self.optimizer, DeepNestedOptimizer):
            self.optimizer.step(loss.item())  # the port guide's loop; clips internally
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
        return time.perf_counter() - start


def make_runners(cfg: RunConfig, names: list[str], base: nn.Module) -> list[Runner]:
    """The plain `torch.optim.AdamW` baseline first, then `names` built by the factory."""
    opt_cfg = cfg.optimizer
    model = copy.deepcopy(base)
    runners = [Runner(BASELINE, model, torch.optim.AdamW(
        model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.betas[0], opt_cfg.betas[1]),
        eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay))]
    for name in names:
        kind, mode, _ = OPTIMIZERS[name]
        nested = dataclasses.replace(opt_cfg.nested_optimizer, mode=mode or "simple")
        ocfg = dataclasses.replace(opt_cfg, type=kind, nested_optimizer=nested)
        model = copy.deepcopy(base)
        runners.append(Runner(name, model, build_optimizer(ocfg, model)))
    return runners


def warm_up(runner: Runner, batches: list[Tensor], steps: int, meta_batch: int) -> None:
    """Untimed steps; a nested optimizer also takes (and times) one real meta-update."""
    opt = runner.optimizer
    if not isinstance(opt, DeepNestedOptimizer):
        for i in range(steps):
            runner.step(batches[i % len(batches)])
        return
    runner.meta_every = opt.meta_update_freq
    if opt.mode == "simple":
        opt.meta_update_freq = steps  # the last warm-up step meta-updates on a full window
        for i in range(steps - 1):
            runner.step(batches[i % len(batches)])
        runner.meta_s = runner.step(batches[(steps - 1) % len(batches)])
        plain = statistics.median(runner.step(batches[0]) for _ in range(2))
        # The meta-update's own cost on top of a plain step (0 when lost in the noise).
        runner.meta_s = max(0.0, runner.meta_s - plain)
        opt.meta_update_freq = runner.meta_every
        return
    for i in range(steps):
        runner.step(batches[i % len(batches)])
    ids = batches[0][:meta_batch]
    start = time.perf_counter()
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        opt.meta_update((ids[:, :-1], ids[:, 1:]), loss_fn=lambda out, y: lm_loss(out[0], y))
    runner.meta_s = time.perf_counter() - start


def measure(runners: list[Runner], batches: list[Tensor], reps: int,
            log: Callable[[str], None]) -> None:
    """Interleaved repetitions: every runner steps once per repetition, order rotated."""
    for r in range(reps):
        order = runners[r % len(runners):] + runners[:r % len(runners)]
        for runner in order:
            runner.times.append(runner.step(batches[r % len(batches)]))
        log(f"rep {r + 1}/{reps}: " + ", ".join(f"{x.name} {x.times[-1] * 1e3:.0f} ms"
                                                  for x in runners))


def summarise(runners: list[Runner]) -> list[dict[str, Any]]:
    base = runners[0].times
    rows = []
    for runner in runners:
        ratios = [t / b for t, b in zip(runner.times, base, strict=True)]
        median_s = statistics.median(runner.times)
        ratio = statistics.median(ratios)
        amortised = ratio
        if runner.meta_s is not None and runner.meta_every:
            amortised = ratio + runner.meta_s / runner.meta_every / statistics.median(base)
        target = OPTIMIZERS[runner.name][2] if runner.name in OPTIMIZERS else None
        rows.append({
            "optimizer": runner.name, "step_s_median": median_s,
            "step_s_min": min(runner.times), "ratio_vs_adamw": ratio,
            "ratio_q25": statistics.quantiles(ratios, n=4)[0] if len(ratios) > 1 else ratio,
            "ratio_q75": statistics.quantiles(ratios, n=4)[2] if len(ratios) > 1 else ratio,
            "meta_update_s": runner.meta_s, "meta_update_every": runner.meta_every,
            "ratio_amortised": amortised, "target": target,
            "meets_target": None if target is None else amortised <= target,
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'optimizer':<16} {'step ms':>8} {'x AdamW':>8} {'IQR':>13} {'meta s':>7} "
              f"{'amortised':>9} {'target':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        meta = "" if r["meta_update_s"] is None else f"{r['meta_update_s']:.2f}"
        target = "" if r["target"] is None else (
            f"<={r['target']:.2f} " + ("ok" if r["meets_target"] else "MISS"))
        print(f"{r['optimizer']:<16} {r['step_s_median'] * 1e3:>8.1f} "
              f"{r['ratio_vs_adamw']:>8.3f} {r['ratio_q25']:>6.3f}-{r['ratio_q75']:<6.3f} "
              f"{meta:>7} {r['ratio_amortised']:>9.3f} {target:>7}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    names = [n for n in (args.only.split(",") if args.only else OPTIMIZERS) if n]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        print(f"unknown optimizers {unknown}; expected some of {list(OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    batch = args.batch_size or cfg.train.batch_size
    seq_len = args.seq_len or cfg.train.seq_len
    # Subnormal floats take a microcode slow path on x86. An optimizer that drives its model to
    # extreme values in these few untuned, unscheduled steps (M3 at the config's lr grows weights
    # by ~6 per step) would otherwise be timed on that slow path in its model's forward/backward,
    # not on its own arithmetic. Flushing them to zero times every optimizer's real work.
    flush_denormal = flush_subnormals()
    seed_everything(cfg.seed)
    base = build(dataclasses.replace(cfg.model, vocab_size=args.vocab_size))
    batches = [torch.randint(0, args.vocab_size, (batch, seq_len + 1)) for _ in range(4)]
    results: dict[str, list[dict[str, Any]]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{args.config}: {sum(p.numel() for p in base.parameters()):,} parameters, "
              f"batch {batch} x {seq_len} tokens, torch {torch.__version__}, {threads} threads")
        runners = make_runners(cfg, names, base)
        for runner in runners:
            warm_up(runner, batches, args.warmup, args.meta_batch_size)
        measure(runners, batches, args.reps, lambda line: print(line, flush=True))
        results[str(threads)] = summarise(runners)
        print_table(results[str(threads)])
    atomic_write_json(args.out, {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "settings": {"config": args.config, "vocab_size": args.vocab_size,
                     "batch_size": batch, "seq_len": seq_len, "reps": args.reps,
                     "warmup": args.warmup, "meta_batch_size": args.meta_batch_size,
                     "baseline": BASELINE, "flush_denormal": flush_denormal},
        "results_by_threads": results,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
