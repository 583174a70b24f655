"""MAD (``eval.mad``) trained from scratch: every model type on every task, scored on the task's
test layout, as MAD does (Poli et al. 2024) but sized for a CPU by default.

Each setting trains a fresh 2-layer model on a fixed training set of the task (drawn once in
the reference's training layout, batches drawn from it with replacement) and reports the share
of scored test tokens whose most likely token is right (MAD's accuracy). ``full`` uses every
task's published setting (sequence length, training and test set sizes; give ``width=128``,
MAD's, too); otherwise sequences are cut to ``max_seq_len`` and the test set to
``test_examples``.

Departures from MAD: one learning rate and a fixed step count (MAD sweeps learning rates and
weight decay and trains for epochs); compression is causal: the reference trains it with an
encoder-decoder that rebuilds the sequence from the compression token's state, here the
compression token is followed by ``seq_len - 2`` blank tokens (one extra token id) at which the
model must emit the sequence in order, so it also has only its state at the compression token
and the positions to go on (``causal_compression``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.eval.mad import TASKS, MADTask
from nestlearn.eval.mqar import IGNORE, answer_accuracy
from nestlearn.eval.report import png_figure, pyplot
from nestlearn.eval.synthetic import (
    FromScratch,
    build_model,
    result_fields,
    sweep_models_by,
    train_from_scratch,
)


def causal_compression(inputs: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """A compression batch ``(n, L)`` (L - 1 tokens, then the compression token) as a causal task:
    inputs ``[x_1..x_{L-1}, C, blank x (L-2)]``, targets x_1..x_{L-1} from C on, ``IGNORE`` before."""
    n, length = inputs.shape
    body = inputs[:, :-1]
    stream = torch.cat([inputs, torch.full((n, length - 2), blank, dtype=inputs.dtype)], dim=1)
    targets = torch.cat([torch.full((n, length - 1), IGNORE, dtype=inputs.dtype), body], dim=1)
    return stream, targets


@dataclass(frozen=True)
class MADSweep(FromScratch):
    """What ``sweep_and_save`` trains: every model x task (``FromScratch``); ``max_seq_len`` and
    ``test_examples`` cap the published settings unless ``full``."""

    AXES: ClassVar[tuple[str, ...]] = ("models", "tasks")
    tasks: tuple[str, ...] = tuple(TASKS)
    test_examples: int = 256
    max_seq_len: int = 64
    full: bool = False

    def check(self) -> None:
        self.check_common(max_seq_len=self.max_seq_len)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown MAD task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
        for name in self.tasks:  # MADTask checks its fields; one example, the rest of the setting
            TASKS[name].generate(self.task(name), 1, torch.Generator(), training=True)

    def task(self, name: str) -> MADTask:
        """The task's published setting, shortened and with a smaller test set unless ``full``."""
        published = TASKS[name].defaults
        if self.full:
            return published
        return dataclasses.replace(published, seq_len=min(published.seq_len, self.max_seq_len),
                                   num_test_examples=min(published.num_test_examples, self.test_examples))


def task_data(name: str, task: MADTask, num: int, generator: torch.Generator, training: bool,
              ) -> tuple[Tensor, Tensor]:
    """``num`` examples of task ``name`` (causal compression for ``compression``)."""
    inputs, targets = TASKS[name].generate(task, num, generator, training=training)
    return causal_compression(inputs, task.vocab_size) if name == "compression" else (inputs, targets)


def train_setting(model_type: str, name: str, sweep: MADSweep,
                  on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one model on one task; its test accuracy, final loss, size, time and whether a loss
    was non-finite (training stops there and scores what it has)."""
    task = sweep.task(name)
    vocab = task.vocab_size + (1 if name == "compression" else 0)  # + the blank token
    train_x, train_y = task_data(name, task, task.num_train_examples, torch.Generator().manual_seed(sweep.seed), True)
    test_x, test_y = task_data(name, task, task.num_test_examples,
                               torch.Generator().manual_seed(10_000 + sweep.seed), False)
    torch.manual_seed(sweep.seed)
    model = build_model(model_type, sweep.width, sweep.layers, train_x.shape[1], vocab)
    draws = torch.Generator().manual_seed(20_000 + sweep.seed)

    def loss_of(step: int) -> Tensor:
        rows = torch.randint(0, train_x.shape[0], (sweep.batch,), generator=draws)
        logits, _ = model(train_x[rows])
        return F.cross_entropy(logits.flatten(0, 1), train_y[rows].flatten(), ignore_index=IGNORE)

    outcome = train_from_scratch(model, loss_of, sweep.steps, sweep.lr, on_step)
    with torch.no_grad():
        hits = 0.0
        for x, y in zip(torch.split(test_x, 64), torch.split(test_y, 64), strict=True):
            hits += float(answer_accuracy(model(x)[0], y)) * int((y != IGNORE).sum())
    accuracy = hits / int((test_y != IGNORE).sum())
    return {"model": model_type, "task": name, "seq_len": int(train_x.shape[1]), "vocab_size": vocab,
            "train_examples": task.num_train_examples, "test_examples": task.num_test_examples,
            "accuracy": accuracy, **result_fields(model, outcome)}


def plot(results: list[dict[str, Any]]) -> bytes | None:
    """Test accuracy per task, one bar per model (PNG)."""
    plt = pyplot()
    if plt is None or not results:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in results))
    model_types = list(dict.fromkeys(r["model"] for r in results))
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.6))
    bar = 0.8 / len(model_types)
    for i, model_type in enumerate(model_types):
        found = {r["task"]: r["accuracy"] for r in results if r["model"] == model_type}
        xs = [j + i * bar for j, t in enumerate(tasks) if t in found]
        ax.bar(xs, [found[t] for t in tasks if t in found], width=bar, label=model_type)
    ax.set_xticks([j + 0.4 - bar / 2 for j in range(len(tasks))], [t.replace("_", "\n") for t in tasks], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("MAD test accuracy")
    ax.legend(fontsize=8)
    return png_figure(fig, plt)


def sweep_and_save(sweep: MADSweep, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Every model x task not yet in ``out_dir/eval/mad.json`` (resumable, ``synthetic.run_sweep``)
    and the bar chart beside it."""
    sweep.check()
    return sweep_models_by("mad", sweep, sweep.tasks, "task",
                           lambda m, name, on_step: train_setting(m, name, sweep, on_step), plot, out_dir)
