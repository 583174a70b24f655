"""Training throughput and MFU of model configs on this machine.

MFU = tokens/s x model FLOPs per token / the machine's measured peak matmul FLOP/s. The peak
is measured here (best of several large square `torch.mm`), not taken from a data sheet, so
the figure says how well the model uses what this machine can actually do. Model FLOPs follow
the PaLM convention (``LanguageModel.flops_per_token``), which counts causal attention's full
score matrix: at long sequences, where attention dominates, a Transformer's MFU can pass 100%
(110% at 1 x 8192 on a 2-core CPU), though its kernel computes only about half of that matrix.

All configs are built first and then stepped in rounds, one step of each per round in a rotated
order; "vs first" is the median over rounds of a config's tokens/s over the first config's in
the same round (with its interquartile range), the figure to quote on a noisy machine. A config
whose loss turns non-finite is dropped from the rounds and flagged, not timed (the speed of a
model that diverges means nothing), and the script then exits 1.

    python benchmarks/train_throughput.py --configs transformer/pilot_smoke,transformer/pilot
    python benchmarks/train_throughput.py --batch-size 1 --seq-len 8192 --flop-count fake \
        --configs transformer/pilot,hope/pilot,hope/pilot:train.activation_checkpointing=true
    python benchmarks/train_throughput.py --configs default \
        --overrides model.d_model=128 model.n_layers=4 --seq-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from nestlearn.config import ConfigError, RunConfig, load_config
from nestlearn.models import LanguageModel, build
from nestlearn.train.activation_checkpoint import apply_activation_checkpointing
from nestlearn.utils.device import resolve_device
from nestlearn.utils.host_memory import retain_freed_memory
from nestlearn.utils.io import atomic_write_json
from nestlearn.utils.numerics import flush_subnormals
from nestlearn.utils.seeding import seed_everything

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="transformer/pilot_smoke,transformer/pilot",
                   help="comma-separated config names, each optionally with its own overrides as "
                        "name:key=value[:key=value]; 'default' is the built-in defaults")
    p.add_argument("--overrides", "--model-overrides", nargs="*", default=[],
                   help="a.b.c=value overrides applied to every config")
    p.add_argument("--seq-len", type=int, help="default: the config's train.seq_len")
    p.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every config each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--flop-count", choices=["eager", "fake", "off"], default="eager",
                   help="executed-FLOP count: one more forward + backward per config under a counter, "
                        "on the real model ('eager'), on fake tensors (no memory, slower: for HOPE "
                        "at long sequences, where 'eager' needs many GB), or not at all")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n peak matmul")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls, after one untimed call (allocations, kernel choice)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best n x n x n matmul: 2 n^3 multiply-adds."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), device, repeats)


@dataclasses.dataclass
class Trial:
    """One config under test: its model, AdamW, random token batches and timed steps."""

    name: str
    cfg: RunConfig
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    batches: list[torch.Tensor]
    peak: float
    times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return bool(self.losses) and not math.isfinite(self.losses[-1])

    @property
    def vocab(self) -> int:
        vocab = self.model.config.vocab_size
        assert vocab is not None  # make_trial builds the model with one
        return vocab

    @property
    def seq_len(self) -> int:
        return self.batches[0].shape[1] - 1  # inputs and their next-token targets

    @property
    def tokens(self) -> int:
        return self.batches[0].shape[0] * self.seq_len

    def step(self, i: int, device: torch.device) -> float:
        """One training step (forward + backward + AdamW) on batch ``i``; its wall time."""
        ids = self.batches[i % len(self.batches)]
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if self.cfg.train.precision == "bf16" else contextlib.nullcontext())
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            logits, _ = self.model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab), ids[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        self.optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - start
        self.losses.append(float(loss.detach()))
        return seconds


def _solve_triangular_flops(a: torch.Size, b: torch.Size, *args: Any, **kwargs: Any) -> int:
    """A (…, n, n) triangular solve against (…, n, k): n² k FLOPs per (broadcast) batch entry,
    n²/2 multiply-adds per right-hand side."""
    lead_a, lead_b = list(a[:-2]), list(b[:-2])
    width = max(len(lead_a), len(lead_b))
    lead_a, lead_b = [1] * (width - len(lead_a)) + lead_a, [1] * (width - len(lead_b)) + lead_b
    return math.prod(max(x, y) for x, y in zip(lead_a, lead_b, strict=True)) * a[-1] ** 2 * b[-1]


def _conv_backward_flops(grad_out: torch.Size, x: torch.Size, w: torch.Size, *args: Any, **kwargs: Any) -> int:
    """Input and weight gradients of a convolution, each as costly as its forward: 2 FLOPs per
    weight per output position and batch entry. (The stock formula ignores ``groups`` and
    counts a depthwise convolution's backward as a dense one.)"""
    output_mask = args[7]  # after bias, stride, padding, dilation, transposed, output_padding, groups
    forward = 2 * grad_out[0] * math.prod(grad_out[2:]) * math.prod(w)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _sdpa_forward(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    """q kᵀ and the scores times v over the full L × S score matrix: 2 FLOPs per multiply-add."""
    batch, length, source = math.prod(q[:-2]), q[-2], k[-2]
    return 2 * batch * length * source * (q[-1] + v[-1])


def _cpu_sdpa_flops(q: torch.Size, k: torch.Size, v: torch.Size, *args: Any, **kwargs: Any) -> int:
    return _sdpa_forward(q, k, v)


def _cpu_sdpa_backward_flops(grad_out: torch.Size, q: torch.Size, k: torch.Size, v: torch.Size, *args: Any,
                             **kwargs: Any) -> int:
    """Two gradient products per forward product (the kernel's recomputation not counted)."""
    return 2 * _sdpa_forward(q, k, v)


EXTRA_FLOP_FORMULAS = {  # ops the stock counter misses or miscounts
    torch.ops.aten.linalg_solve_triangular: _solve_triangular_flops,
    torch.ops.aten.convolution_backward: _conv_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def executed_flops_per_token(trial: Trial, fake: bool) -> float:
    """FLOPs of one forward + backward as executed, per token: every matmul, batched matmul,
    convolution, attention kernel and triangular solve counted from its shapes
    (``FlopCounterMode``). Unlike ``flops_per_token`` (a model estimate), it includes the
    chunk-wise memories' extra products; attention counts its full score matrix, as there.
    ``fake``: on a copy of the model built from fake tensors, which hold shapes, not data."""
    if not fake:
        flops = _counted_flops(trial.model, trial.batches[0])
        trial.optimizer.zero_grad(set_to_none=True)
        return flops / trial.tokens
    with FakeTensorMode():  # on the CPU: the count depends on shapes only
        model = build_model(trial.cfg, trial.vocab, None)
        return _counted_flops(model, torch.zeros(trial.batches[0].shape, dtype=torch.long)) / trial.tokens


def _counted_flops(model: LanguageModel, ids: torch.Tensor) -> float:
    # eager: the counter sees each op, where a compiled region would hide the ones it fused
    with torch.compiler.set_stance("force_eager"), \
            FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
        torch.autograd.backward(loss)
    return float(counter.get_total_flops())


def build_model(cfg: RunConfig, vocab: int, device: torch.device | None) -> LanguageModel:
    """The config's model with its vocabulary, checkpointed as its ``train`` section says, on
    ``device`` (``None``: where it is built, as for fake tensors, which cannot be moved)."""
    model = build(dataclasses.replace(cfg.model, vocab_size=vocab))
    if device is not None:
        model = model.to(device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def make_trial(name: str, cfg: RunConfig, args: argparse.Namespace, device: torch.device,
               peak: float) -> Trial:
    seq_len = args.seq_len or cfg.train.seq_len
    batch = args.batch_size or cfg.train.batch_size
    vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    seed_everything(cfg.seed)
    model = build_model(cfg, vocab, device)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.betas[0], opt.betas[1]),
                                  eps=opt.eps, weight_decay=opt.weight_decay)
    batches = [torch.randint(0, vocab, (batch, seq_len + 1), device=device) for _ in range(4)]
    return Trial(name, cfg, model, optimizer, batches, peak)


def run_rounds(trials: list[Trial], args: argparse.Namespace, device: torch.device) -> None:
    """``--warmup`` + ``--steps`` rounds; each steps every trial once, in an order rotated per
    round, so that a slow spell of the machine falls on all configs alike."""
    for r in range(args.warmup + args.steps):
        running = [t for t in trials if not t.diverged]
        if not running:
            return
        for trial in running[r % len(running):] + running[:r % len(running)]:
            seconds = trial.step(r, device)
            if trial.diverged:
                print(f"{trial.name}: non-finite loss at step {r + 1}; not timed", file=sys.stderr)
            elif r >= args.warmup:
                trial.times.append(seconds)
        if r >= args.warmup:
            print(f"step {r - args.warmup + 1}/{args.steps}: "
                  + ", ".join(f"{t.name} {t.times[-1] * 1e3:.0f} ms" for t in running if not t.diverged),
                  file=sys.stderr)


def summarise(trial: Trial, base: Trial, flop_count: str) -> dict[str, Any]:
    """A row of the table: throughput, MFU, executed FLOP rate (``flop_count``: eager, fake or
    off) and the tokens/s ratio to ``base`` (the first config), the median over rounds of the
    ratio within each round."""
    step_s = statistics.median(trial.times)
    executed = None if flop_count == "off" else executed_flops_per_token(trial, fake=flop_count == "fake")
    tokens_per_s = trial.tokens / step_s
    flops_per_token = trial.model.flops_per_token(trial.seq_len)
    ratios = [(trial.tokens / t) / (base.tokens / b) for t, b in zip(trial.times, base.times, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    cfg = trial.cfg
    return {
        "config": trial.name, "model_type": cfg.model.type, "precision": cfg.train.precision,
        "params": trial.model.num_params(), "non_embedding_params": trial.model.num_params(True),
        "vocab_size": trial.vocab, "batch_size": trial.batches[0].shape[0],
        "seq_len": trial.seq_len,
        "step_s_median": step_s, "step_s_min": min(trial.times), "step_s_max": max(trial.times),
        "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
        "achieved_flops": tokens_per_s * flops_per_token, "peak_flops": trial.peak,
        "mfu": tokens_per_s * flops_per_token / trial.peak,
        "executed_flops_per_token": executed,
        "executed_flops": None if executed is None else tokens_per_s * executed,
        "executed_fraction_of_peak": None if executed is None else tokens_per_s * executed / trial.peak,
        "ratio_vs_first": statistics.median(ratios), "ratio_q25": quartiles[0], "ratio_q75": quartiles[2],
        "loss_first": trial.losses[0], "loss_last": trial.losses[-1],
        "activation_checkpointing": cfg.train.activation_checkpointing,
        # the process's resident high-water mark (all configs live at once)
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'config':<44} {'params':>9} {'B':>4} {'T':>5} {'step ms':>9} {'tok/s':>10} "
              f"{'MFLOP/tok':>10} {'MFU':>7} {'exec MFLOP/tok':>15} {'exec GFLOP/s':>13} {'vs first (IQR)':>20}")
    print(header)
    print("-" * len(header))
    for r in rows:
        executed = (f"{'-':>15} {'-':>13}" if r["executed_flops"] is None else
                    f"{r['executed_flops_per_token'] / 1e6:>15.2f} {r['executed_flops'] / 1e9:>13.2f}")
        print(f"{r['config']:<44} {r['params'] / 1e6:>8.2f}M {r['batch_size']:>4} {r['seq_len']:>5} "
              f"{r['step_s_median'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['flops_per_token'] / 1e6:>10.2f} {r['mfu'] * 100:>6.1f}% {executed} "
              f"{r['ratio_vs_first']:>7.3f} ({r['ratio_q25']:.3f}-{r['ratio_q75']:.3f})")


def load_named(spec: str, overrides: list[str]) -> RunConfig | None:
    """The config of ``name[:key=value...]`` with the global then its own overrides, or None
    (with a note) if it does not exist yet."""
    name, *own = spec.split(":")
    overrides = [*overrides, *own]
    try:
        return load_config(None if name == "default" else name, overrides)
    except ConfigError as exc:
        if exc.key != "--config-name":
            raise
        print(f"skipping {name}: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flushed = flush_subnormals()  # as training does (train.flush_subnormals); before the thread pool
    retained = retain_freed_memory()  # as training does (train.retain_freed_memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configs = [(n, load_named(n, args.overrides)) for n in args.configs.split(",") if n]
    found = [(n, c) for n, c in configs if c is not None]
    if not found:
        print("no config found; try --configs default --overrides model.d_model=128 ...",
              file=sys.stderr)
        return 2

    peaks = {p: peak_matmul_flops(device, DTYPES[p], args.matmul_size)
             for p in sorted({c.train.precision for _, c in found} | {"fp32"})}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          + ", ".join(f"peak {p} matmul {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items()))
    trials = [make_trial(n, c, args, device, peaks[c.train.precision]) for n, c in found]
    run_rounds(trials, args, device)
    timed = [t for t in trials if not t.diverged]
    rows = [summarise(t, timed[0], args.flop_count) for t in timed]
    if rows:
        print_table(rows)
    diverged = {t.name: len(t.losses) for t in trials if t.diverged}
    for name, step in diverged.items():
        print(f"{name}: NOT TIMED, non-finite loss at step {step}")
    atomic_write_json(args.out, {
        "machine": {"device": str(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "matmul_size": args.matmul_size,
                    "peak_flops": peaks},
        "settings": {"steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
                     "flush_subnormals": flushed,
                     "retain_freed_memory": retained, "flop_count": args.flop_count},
        "results": rows,
        "non_finite_loss_at_step": diverged,
    })
    print(f"wrote {args.out}")
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
