"""Equal-budget quality study: Transformer++, Titans MAC, HOPE and Hope-attention, and HOPE's
ablations, at smoke scale on the default corpus (issue 19 §4).

Every model is its family's smoke config (`transformer/pilot_smoke`, `titans/pilot_smoke`,
`hope/pilot_smoke`; parameters within ±3% of the Transformer's 2.164M), trained on the same
data, tokenizer, batches (16 x 256 tokens a step), warmup and cosine schedule. Phases:

  sweep      each model at four learning rates, seed 0, `--sweep-tokens` (default 1M)
  final      each model at its best swept rate, seeds 0-2 (`--seeds`), `--final-tokens` (default 3M)
  ablations  HOPE at its best rate, seed 0, `--ablation-tokens` (default 1M, the sweep's budget:
             fourteen 3M runs would take ~10 hours here; 3010560 is issue 19's budget, with
             its own run names), beside HOPE with every mechanism on at
             seeds 0 and 1 (the seed-1 run sizes the noise): the paper's rows (without DGD,
             momentum, weight decay or CMS; k or v a static projection, i.e. at the lowest
             frequency), no self-modification (k, v, q static), and issue 19's fixes undone
             one at a time (the level-clock rules `optimizer.level_lr`, chunk-start reads) or,
             for fix 3, switched on (`mix_input`: the generators read the whole token)

`--lr MODEL=RATE` (repeatable) fixes a model's rate instead of taking the sweep's best, so the
final and ablation phases can run without the sweep's run directories.

Each run is a `nestlearn` run directory under `--out-dir`; a run that was cut off resumes from
its last checkpoint and a finished one is not trained again, so the same command picks up where
it stopped. The table (validation loss in nats/token and bits/byte) is printed and written to
`--json` with the curves' points; `--plots` draws loss against tokens and against wall-clock
seconds. Wall-clock figures are only comparable between runs that had the machine alone.

    python benchmarks/quality.py --phase sweep --models transformer,titans_mac
    python benchmarks/quality.py --phase final
    python benchmarks/quality.py --phase ablations --lr hope=3e-3
    python benchmarks/quality.py --phase report     # tables and curves of what has finished
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from nestlearn import pipeline
from nestlearn.config import RunConfig, load_config
from nestlearn.data import PreparedData
from nestlearn.train.metrics import read_jsonl
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json, read_json

MODELS: dict[str, tuple[str, list[str]]] = {
    "transformer": ("transformer/pilot_smoke", []),
    "titans_mac": ("titans/pilot_smoke", []),
    # compiled chunks: the eager path's equations (tested equal in float64), ~1.4x the tokens/s
    "hope": ("hope/pilot_smoke", ["model.self_ref.compile=true"]),
    "hope_attention": ("hope/pilot_smoke", ["model.type=hope_attention"]),
}
LEARNING_RATES = (7.5e-4, 1.5e-3, 3e-3, 6e-3)
SEEDS = (0, 1, 2)
# In the order they run (a study cut short has the paper's rows first).
ABLATIONS: dict[str, list[str]] = {
    "no_dgd": ["model.self_ref.dgd=false"],
    "no_momentum": ["model.self_ref.momentum=false"],
    "no_weight_decay": ["model.self_ref.weight_decay=false"],
    "no_cms": ["model.cms.chunk_sizes=[1,1]"],  # both levels every step: no multi-frequency
    # no self-modification: k, v, q all static (the outside study "Dissecting HOPE" finds it
    # the one mechanism that helps at small scale)
    "kv_lowest_frequency": ["model.self_ref.static_projections=[q,k,v]"],
    "k_lowest_frequency": ["model.self_ref.static_projections=[q,k]"],
    "v_lowest_frequency": ["model.self_ref.static_projections=[q,v]"],
    # the memory layers' steps by their input energy alone (before the curvature step)
    "input_energy_step": ["model.self_ref.curvature_step=false"],
    # the level clocks' rate rules (fix 1 chose sqrt): a firing's Adam step is base x C^e
    "level_lr_mean": ["optimizer.level_lr=mean"],  # e = -1, the seed's rule
    "level_lr_flat": ["optimizer.level_lr=flat"],  # e = 0: each firing a fast-sized step
    "level_lr_linear": ["optimizer.level_lr=linear"],  # e = 1
    "chunk_start_read": ["model.self_ref.in_chunk_reads=false"],  # the reads before fix 2
    "mix_input": ["model.self_ref.mix_input=true"],  # fix 3: generators see the whole token
}
BATCH, SEQ_LEN = 16, 256
ABLATION_TOKENS = 1_003_520  # 245 steps, the sweep's budget


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study: its name (= run directory) and config."""

    name: str
    model: str
    lr: float
    seed: int
    tokens: int
    overrides: tuple[str, ...] = ()

    def config(self, args: argparse.Namespace) -> RunConfig:
        config_name, own = MODELS[self.model]
        steps = self.tokens // (BATCH * SEQ_LEN)
        every = max(10, steps // 12 // 10 * 10)
        return load_config(config_name, [
            *own, *self.overrides, f"name={self.name}", f"seed={self.seed}",
            f"out_dir={args.out_dir}", f"data.max_chars_per_source={args.max_chars}",
            f"optimizer.lr={self.lr}", f"train.steps={steps}", f"train.batch_size={BATCH}",
            f"train.seq_len={SEQ_LEN}", f"train.eval_every={every}", f"train.ckpt_every={every}",
            "train.eval_batches=16", "train.log_every=10", f"train.threads={args.threads}",
            "logging.progress=none"])


def sweep_runs(models: list[str], tokens: int) -> list[Run]:
    return [Run(f"sweep_{m}_lr{lr:g}", m, lr, 0, tokens) for m in models for lr in LEARNING_RATES]


def best_lr(model: str, args: argparse.Namespace) -> float | None:
    """`--lr`'s rate for the model, else the swept rate with the lowest final validation loss
    (None until the sweep is done)."""
    if model in args.lr:
        return float(args.lr[model])
    losses = {r.lr: final_loss(r, args) for r in sweep_runs([model], args.sweep_tokens)}
    if any(v is None for v in losses.values()):
        return None
    return min(losses, key=lambda lr: losses[lr] or math.inf)


def final_runs(models: list[str], args: argparse.Namespace, warn: bool = False) -> list[Run]:
    runs = []
    for m in models:
        lr = best_lr(m, args)
        if lr is None:
            if warn:
                print(f"{m}: the sweep is not finished; run --phase sweep first", file=sys.stderr)
            continue
        runs += [Run(f"final_{m}_s{s}", m, lr, s, args.final_tokens) for s in args.seeds]
    return runs


def ablation_runs(args: argparse.Namespace, warn: bool = False) -> list[Run]:
    lr = best_lr("hope", args)
    if lr is None:
        if warn:
            print("hope: the sweep is not finished; run --phase sweep first", file=sys.stderr)
        return []
    budget = "" if args.ablation_tokens == ABLATION_TOKENS else f"_{args.ablation_tokens}"  # its own runs
    base = [Run(f"ablation_all_on_s{s}{budget}", "hope", lr, s, args.ablation_tokens) for s in (0, 1)]
    rows = [Run(f"ablation_{name}{budget}", "hope", lr, 0, args.ablation_tokens, tuple(o))
            for name, o in ABLATIONS.items()]
    # the seed-1 baseline after the paper's rows and "Dissecting HOPE"'s: it sizes their noise
    runs = [base[0], *rows[:7], base[1], *rows[7:]]
    return [r for r in runs if not args.rows or ablation_row(r) in args.rows]


def ablation_row(run: Run) -> str:
    """The row an ablation run belongs to: its name without the prefix and budget suffix."""
    return run.name.removeprefix("ablation_").removesuffix(f"_{run.tokens}")


def metrics(run: Run, args: argparse.Namespace) -> dict[str, Any] | None:
    path = Path(args.out_dir) / run.name / "metrics.json"
    return read_json(path) if path.exists() else None


def final_loss(run: Run, args: argparse.Namespace) -> float | None:
    """The run's final validation loss; inf for a failed run, None for one not finished."""
    final = metrics(run, args)
    if final is None:
        return None
    if pipeline.failure(final) is not None:
        return math.inf
    return float(final["val_loss"]) if final["step"] >= run.tokens // (BATCH * SEQ_LEN) else None


def train(runs: list[Run], args: argparse.Namespace) -> None:
    data: PreparedData | None = None
    for i, run in enumerate(runs, 1):
        if final_loss(run, args) is not None:
            continue
        cfg = run.config(args)
        if data is None:
            data = pipeline.prepare(cfg, log=lambda _: None)
        print(f"[{i}/{len(runs)}] {run.name}: {cfg.model.type}, lr {run.lr:g}, seed {run.seed}, "
              f"{cfg.train.steps} steps", flush=True)
        _, final = pipeline.train(cfg, data, resume="auto", log=lambda _: None)
        status = pipeline.failure(final) or f"val loss {final['val_loss']:.4f}"
        print(f"  {run.name}: {status} ({final['train_time_s']:.0f} s)", flush=True)


def curve(run: Run, args: argparse.Namespace) -> list[tuple[int, float, float]]:
    """(tokens, train seconds, validation loss) at every evaluation of the run."""
    records = read_jsonl(Path(args.out_dir) / run.name / "metrics.jsonl")
    seconds = {r["step"]: r["time"] for r in records if r.get("split") == "train"}
    return [(r["step"] * BATCH * SEQ_LEN, seconds.get(r["step"], math.nan), r["val_loss"])
            for r in records if r.get("split") == "val"]


def row(label: str, runs: list[Run], args: argparse.Namespace) -> dict[str, Any] | None:
    finals = [metrics(r, args) for r in runs]
    found = [final_loss(r, args) for r in runs]
    losses = [x for x in found if x is not None]
    if len(losses) < len(runs):
        return None
    done = [f for f in finals if f is not None]
    bpb = [float(f.get("val_bpb", math.inf)) if not f.get("failed") else math.inf for f in done]
    return {"row": label, "model": runs[0].model, "lr": runs[0].lr, "seeds": [r.seed for r in runs],
            "tokens": runs[0].tokens, "params": done[0].get("params"),
            "val_loss": losses, "val_loss_mean": statistics.fmean(losses),
            "val_loss_spread": (max(losses) - min(losses)) / 2,
            "val_bpb_mean": statistics.fmean(bpb),
            "tokens_per_s": statistics.fmean(float(f["tokens_per_s"]) for f in done),
            "failed": [f["failed"] for f in done if f.get("failed")],
            "curves": {r.name: curve(r, args) for r in runs}}


def tables(models: list[str], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    sweep = [r for r in (row(run.name, [run], args) for run in sweep_runs(models, args.sweep_tokens)) if r]
    final = []
    for m in models:
        runs = [r for r in final_runs([m], args) if r.model == m]
        if runs and (r := row(m, runs, args)) is not None:
            final.append(r)
    ablations = []
    runs = ablation_runs(args) if "hope" in models else []
    base, rest = [r for r in runs if not r.overrides], [r for r in runs if r.overrides]
    base = [r for r in base if final_loss(r, args) is not None]  # the seeds finished so far
    if base and (r := row("hope (all on)", base, args)) is not None:
        ablations.append(r)
    for run in rest:
        if (r := row(ablation_row(run), [run], args)) is not None:
            ablations.append(r)
    return {"sweep": sweep, "final": final, "ablations": ablations}


def print_tables(found: dict[str, list[dict[str, Any]]]) -> None:
    for title, rows in found.items():
        if not rows:
            continue
        print(f"\n{title}")
        header = (f"{'row':<30} {'lr':>7} {'seeds':>6} {'tokens':>8} {'params':>8} "
                  f"{'val loss (± half-range)':>24} {'bits/byte':>9} {'tok/s':>7}")
        print(header)
        print("-" * len(header))
        for r in rows:
            loss = "FAILED" if r["failed"] else f"{r['val_loss_mean']:.4f} ± {r['val_loss_spread']:.4f}"
            print(f"{r['row']:<30} {r['lr']:>7.2g} {len(r['seeds']):>6} {r['tokens'] / 1e6:>7.2f}M "
                  f"{(r['params'] or 0) / 1e6:>7.3f}M {loss:>24} {r['val_bpb_mean']:>9.4f} "
                  f"{r['tokens_per_s']:>7.0f}")


def plot(found: dict[str, list[dict[str, Any]]], directory: Path) -> list[Path]:
    """Validation loss against tokens and against train seconds, per table with curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the report extra): no plots", file=sys.stderr)
        return []
    import io

    written = []
    for title in ("final", "ablations"):
        if not found[title]:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, r in enumerate(found[title]):
            for j, points in enumerate(r["curves"].values()):
                tokens, seconds, loss = zip(*points, strict=True) if points else ((), (), ())
                label = r["row"] if j == 0 else None
                axes[0].plot(tokens, loss, color=f"C{i}", alpha=0.8, label=label)
                axes[1].plot(seconds, loss, color=f"C{i}", alpha=0.8, label=label)
        for ax, xlabel in zip(axes, ("training tokens", "training seconds (this CPU)"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/token)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"quality study: {title}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = directory / f"quality_{title}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["sweep", "final", "ablations", "report"], default="report")
    p.add_argument("--models", default=",".join(MODELS), help=f"some of {', '.join(MODELS)}")
    p.add_argument("--sweep-tokens", type=int, default=1_003_520, help="tokens per sweep run (245 steps)")
    p.add_argument("--final-tokens", type=int, default=3_010_560, help="tokens per final run (735 steps)")
    p.add_argument("--ablation-tokens", type=int, default=ABLATION_TOKENS,
                   help="tokens per ablation run (245 steps)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="the final phase's seeds (e.g. 1,2 to add seeds to a finished seed 0)")
    p.add_argument("--rows", default="",
                   help="only these ablation rows (comma-separated, e.g. all_on_s1,mix_input)")
    p.add_argument("--lr", action="append", default=[], metavar="MODEL=RATE",
                   help="use this rate for MODEL instead of the sweep's best")
    p.add_argument("--max-chars", default="null",
                   help="data.max_chars_per_source (null: the whole standard library)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="runs/quality")
    p.add_argument("--json", default="benchmarks/results/quality.json")
    p.add_argument("--plots", default="benchmarks/results", help="directory of the PNGs ('' for none)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if unknown := sorted(set(models) - set(MODELS)):
        p.error(f"unknown models {unknown}; expected some of {', '.join(MODELS)}")
    args.models = models
    rates: dict[str, float] = {}
    for item in args.lr:
        model, _, rate = item.partition("=")
        if model not in MODELS:
            p.error(f"--lr {item!r}: unknown model {model!r}; expected one of {', '.join(MODELS)}")
        try:
            rates[model] = float(rate)
        except ValueError:
            p.error(f"--lr {item!r}: expected MODEL=RATE with a number, e.g. hope=3e-3")
    args.lr = rates
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    rows = ["all_on_s0", "all_on_s1", *ABLATIONS]
    args.rows = [r for r in args.rows.split(",") if r]
    if unknown := sorted(set(args.rows) - set(rows)):
        p.error(f"--rows: unknown rows {unknown}; expected some of {', '.join(rows)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "sweep":
        train(sweep_runs(args.models, args.sweep_tokens), args)
    elif args.phase == "final":
        train(final_runs(args.models, args, warn=True), args)
    elif args.phase == "ablations":
        train(ablation_runs(args, warn=True), args)
    found = tables(args.models, args)
    print_tables(found)
    atomic_write_json(Path(args.json), {"settings": {
        "batch": BATCH, "seq_len": SEQ_LEN, "learning_rates": LEARNING_RATES, "seeds": args.seeds,
        "sweep_tokens": args.sweep_tokens, "final_tokens": args.final_tokens,
        "ablation_tokens": args.ablation_tokens, "fixed_lr": args.lr,
        "max_chars_per_source": args.max_chars, "threads": args.threads}, **found})
    print(f"wrote {args.json}")
    if args.plots:
        for path in plot(found, Path(args.plots)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
