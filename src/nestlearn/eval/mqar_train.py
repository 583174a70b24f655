"""In-context recall (MQAR, ``eval.mqar``): train small models of each type from scratch and
sweep sequence length and width, as Zoology does (Arora et al. 2023), on this machine.

Each setting trains a fresh 2-layer model of the registered type at the given width on freshly
drawn MQAR batches (loss only at the answer positions) and reports its answer accuracy on a
fixed held-out set. Departures from Zoology, for CPU budgets: one learning rate (Zoology sweeps
four and reports the best), a few thousand steps instead of its epochs over 100k examples, and
vocabulary 8192 kept but fewer evaluation examples. The number of key-value pairs defaults to
``seq_len / 16`` (Zoology's 64 → 4 ... 512 → 32). Results are written after every setting, and a
rerun skips the settings already there, so a long sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nestlearn import models
from nestlearn.config import load_config
from nestlearn.eval.mqar import IGNORE, MQARConfig, answer_accuracy, mqar_batch
from nestlearn.eval.report import MQAR_FILE, png_figure, pyplot
from nestlearn.models.base import LanguageModel
from nestlearn.train.progress import Progress
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json, read_json

MODELS = ("transformer", "hope_attention", "titans_mac", "hope")


@dataclass(frozen=True)
class MQARSweep:
    """What ``run_mqar`` trains: every model x sequence length x width, each ``steps`` steps of
    ``batch`` fresh examples at learning rate ``lr`` (AdamW, warmup then cosine), then scored on
    ``eval_examples`` held-out ones. ``num_pairs``: per sequence length; ``None``: seq_len / 16."""

    models: tuple[str, ...] = MODELS
    seq_lens: tuple[int, ...] = (64, 128, 256)
    widths: tuple[int, ...] = (64, 128, 256)
    num_pairs: int | None = None
    vocab_size: int = 8192
    layers: int = 2
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    eval_examples: int = 512
    seed: int = 0

    def check(self) -> None:
        unknown = [m for m in self.models if m not in models.available()]
        if unknown:
            raise ValueError(f"unknown model type(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(models.available())}")
        if min(self.widths, default=0) < 8 or any(w % 8 for w in self.widths):
            raise ValueError(f"widths must be multiples of 8, >= 8, got {list(self.widths)}")
        if self.steps < 1 or self.batch < 1 or self.eval_examples < 1 or not self.lr > 0:
            raise ValueError("steps, batch, eval_examples and lr must be positive")
        for n in self.seq_lens:
            self.task(n)  # MQARConfig checks the setting

    def task(self, seq_len: int) -> MQARConfig:
        return MQARConfig(seq_len=seq_len, num_pairs=self.num_pairs or max(1, seq_len // 16),
                          vocab_size=self.vocab_size)

    def training(self) -> dict[str, Any]:
        """The settings a stored result must share to be reused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("models", "seq_lens", "widths")}


def build_model(model_type: str, width: int, layers: int, seq_len: int, vocab_size: int) -> LanguageModel:
    """A small model of ``model_type`` from its family's smoke config, at ``width`` (heads of 32,
    or one head below 32) and ``layers``; chunked memories never longer than the sequence."""
    from nestlearn.pipeline import FAMILIES

    heads = max(1, width // 32)
    overrides = [f"model.type={model_type}", f"model.d_model={width}", f"model.n_layers={layers}",
                 f"model.n_heads={heads}", f"model.vocab_size={vocab_size}", f"model.mlp_hidden={2 * width}",
                 f"model.max_seq_len={max(seq_len, 64)}"]
    cfg = load_config(f"{FAMILIES[model_type]}/pilot_smoke", overrides).model
    if cfg.self_ref is not None:
        chunk = min(cfg.self_ref.memory_chunk_size, seq_len)
        cfg = dataclasses.replace(cfg, self_ref=dataclasses.replace(
            cfg.self_ref, memory_chunk_size=chunk, other_chunk_size=chunk, compile=False))
    return models.build(cfg)


def train_setting(model_type: str, width: int, seq_len: int, sweep: MQARSweep,
                  on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one model on one setting; its accuracy, final loss, size, time and whether a loss
    was non-finite (training stops there and scores what it has)."""
    task = sweep.task(seq_len)
    torch.manual_seed(sweep.seed)
    model = build_model(model_type, width, sweep.layers, seq_len, sweep.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=sweep.lr, weight_decay=0.0)
    warmup = max(1, sweep.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / sweep.steps))))
    data = torch.Generator().manual_seed(sweep.seed)
    held_x, held_y = mqar_batch(task, sweep.eval_examples, torch.Generator().manual_seed(10_000 + sweep.seed))
    start, loss_value, finite = time.perf_counter(), math.nan, True
    model.train()
    for step in range(1, sweep.steps + 1):
        x, y = mqar_batch(task, sweep.batch, data)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            finite = False
            break
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss_value)
    model.eval()
    with torch.no_grad():
        accuracy = float(answer_accuracy(model(held_x)[0], held_y))
    return {"model": model_type, "seq_len": seq_len, "width": width, "num_pairs": task.num_pairs,
            "accuracy": accuracy, "final_loss": loss_value, "finite": finite,
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}


def run_mqar(sweep: MQARSweep, previous: list[dict[str, Any]] | None = None,
             on_result: Callable[[list[dict[str, Any]]], None] | None = None,
             on_step: Callable[[str, int, float], None] | None = None) -> list[dict[str, Any]]:
    """Every model x seq_len x width not already in ``previous`` (results of the same training
    settings); ``on_result`` gets the results so far after each setting (to save them)."""
    sweep.check()
    results = list(previous or [])
    done = {(r["model"], r["seq_len"], r["width"]) for r in results}
    for model_type in sweep.models:
        for seq_len in sweep.seq_lens:
            for width in sweep.widths:
                if (model_type, seq_len, width) in done:
                    continue
                step_hook = None
                if on_step is not None:
                    name = f"{model_type} T={seq_len} d={width}"

                    def step_hook(step: int, loss: float, name: str = name) -> None:
                        assert on_step is not None
                        on_step(name, step, loss)
                results.append(train_setting(model_type, width, seq_len, sweep, step_hook))
                if on_result is not None:
                    on_result(results)
    return results


def plot(results: list[dict[str, Any]]) -> bytes | None:
    """Accuracy against width, one panel per sequence length, one line per model (PNG)."""
    plt = pyplot()
    if plt is None or not results:
        return None
    seq_lens = sorted({r["seq_len"] for r in results})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4 * len(seq_lens), 3.4), squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], seq_lens, strict=True):
        for model_type in dict.fromkeys(r["model"] for r in results):
            rows = sorted((r for r in results if r["model"] == model_type and r["seq_len"] == seq_len),
                          key=lambda r: r["width"])
            if rows:
                ax.plot([r["width"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=model_type)
        ax.set_xscale("log", base=2)
        ax.set_title(f"sequence length {seq_len}")
        ax.set_xlabel("model width")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8)
    return png_figure(fig, plt)


def sweep_and_save(sweep: MQARSweep, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """``run_mqar`` with its results in ``out_dir/eval/mqar.json`` (rewritten after every setting,
    so a stopped sweep resumes) and the plot beside it; a progress display over all steps."""
    sweep.check()
    path = out_dir / MQAR_FILE
    previous: list[dict[str, Any]] = []
    if path.exists():
        stored = read_json(path)
        if stored.get("training") != sweep.training():
            raise ValueError(f"{path} holds results of other training settings ({stored.get('training')}); "
                             "give another --out-dir or the same settings")
        previous = stored["results"]
    done = {(r["model"], r["seq_len"], r["width"]) for r in previous}
    pending = sum((m, n, w) not in done for m in sweep.models for n in sweep.seq_lens for w in sweep.widths)
    progress = Progress(pending * sweep.steps, desc="mqar", every_seconds=30.0)
    finished = [0]

    def on_step(name: str, step: int, loss: float) -> None:
        progress.update(finished[0] * sweep.steps + step, setting=name, loss=loss)

    def save(results: list[dict[str, Any]]) -> None:
        finished[0] = len(results) - len(previous)
        blob = {"task": "mqar", "training": sweep.training(), "results": results,
                "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, blob)

    results = run_mqar(sweep, previous, save, on_step)
    progress.close()
    blob = {"task": "mqar", "training": sweep.training(), "results": results,
            "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_json(path, blob)
    png = plot(results)
    if png is not None:
        atomic_write_bytes(path.with_suffix(".png"), png)
    return path, blob
