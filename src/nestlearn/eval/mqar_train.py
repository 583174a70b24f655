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
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from nestlearn.eval.mqar import IGNORE, MQARConfig, answer_accuracy, mqar_batch
from nestlearn.eval.report import png_figure, pyplot
from nestlearn.eval.synthetic import (
    Sweep,
    build_model,
    check_settings,
    result_fields,
    run_sweep,
    scored_logits,
    train_from_scratch,
)

MODELS = ("transformer", "hope_attention", "titans_mac", "hope")


@dataclass(frozen=True)
class MQARSweep:
    """What ``sweep_and_save`` trains: every model x sequence length x width, each ``steps`` steps of
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
        check_settings(self.models, self.widths, steps=self.steps, batch=self.batch,
                       eval_examples=self.eval_examples, lr=self.lr)
        for n in self.seq_lens:
            self.task(n)  # MQARConfig checks the setting

    def task(self, seq_len: int) -> MQARConfig:
        return MQARConfig(seq_len=seq_len, num_pairs=self.num_pairs or max(1, seq_len // 16),
                          vocab_size=self.vocab_size)

    def training(self) -> dict[str, Any]:
        """The settings a stored result must share to be reused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("models", "seq_lens", "widths")}


def train_setting(model_type: str, width: int, seq_len: int, sweep: MQARSweep,
                  on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one model on one setting; its accuracy, final loss, size, time and whether a loss
    was non-finite (training stops there and scores what it has)."""
    task = sweep.task(seq_len)
    torch.manual_seed(sweep.seed)
    model = build_model(model_type, width, sweep.layers, seq_len, sweep.vocab_size)
    data = torch.Generator().manual_seed(sweep.seed)
    held_x, held_y = mqar_batch(task, sweep.eval_examples, torch.Generator().manual_seed(10_000 + sweep.seed))

    def loss_of(step: int) -> torch.Tensor:
        return F.cross_entropy(*scored_logits(model, *mqar_batch(task, sweep.batch, data), IGNORE))

    outcome = train_from_scratch(model, loss_of, sweep.steps, sweep.lr, on_step)
    with torch.no_grad():
        logits, answers = scored_logits(model, held_x, held_y, IGNORE)
        accuracy = float(answer_accuracy(logits, answers))
    return {"model": model_type, "seq_len": seq_len, "width": width, "num_pairs": task.num_pairs,
            "accuracy": accuracy, **result_fields(model, outcome)}


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
    """Every model x seq_len x width not yet in ``out_dir/eval/mqar.json`` (``synthetic.run_sweep``:
    rewritten after every setting, so a stopped sweep resumes), and the plot beside it."""
    sweep.check()

    def run(setting: Hashable, on_step: Callable[[int, float], None]) -> dict[str, Any]:
        model_type, seq_len, width = cast("tuple[str, int, int]", setting)
        return train_setting(model_type, width, seq_len, sweep, on_step)

    settings: list[Hashable] = [(m, n, w) for m in sweep.models for n in sweep.seq_lens for w in sweep.widths]
    return run_sweep(Sweep("mqar", sweep.training(), settings, lambda r: (r["model"], r["seq_len"], r["width"]),
                           run, sweep.steps, plot), out_dir)
