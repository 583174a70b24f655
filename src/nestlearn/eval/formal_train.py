"""Formal languages (``eval.formal``) trained from scratch: every model type learns the character
prediction task of each language on short strings and is tested on longer ones (length
generalisation), as in Bhattamishra et al. 2020.

The model reads a member string; after each prefix its outputs over ``alphabet + END`` are read
as independent logits of "this symbol may come next" (sigmoid, binary cross-entropy against the
multi-hot targets, padding masked). A string counts as recognised only if every position's
thresholded prediction is right; the score per length bin is the share of recognised strings
(the source's accuracy). Training draws fresh members from the training range every step.
Departure: one learning rate and a fixed step count (the source sweeps both and stops early).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.eval.formal import (
    LANGUAGES,
    Range,
    all_correct,
    encode,
    encode_targets,
    sample_members,
)
from nestlearn.eval.report import png_figure, pyplot
from nestlearn.eval.synthetic import (
    FromScratch,
    build_model,
    result_fields,
    sweep_models_by,
    train_from_scratch,
)


@dataclass(frozen=True)
class FormalSweep(FromScratch):
    """What ``sweep_and_save`` trains: every model x language (``FromScratch``), fresh member
    strings every step, then ``test_examples`` strings per length bin (the training range and
    each of the language's test bins)."""

    AXES: ClassVar[tuple[str, ...]] = ("models", "languages")
    languages: tuple[str, ...] = tuple(LANGUAGES)

    def check(self) -> None:
        self.check_common()
        unknown = [name for name in self.languages if name not in LANGUAGES]
        if unknown:
            raise ValueError(f"unknown language(s) {', '.join(unknown)}; expected some of {', '.join(LANGUAGES)}")


def char_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean binary cross-entropy of the logits over ``alphabet + END`` at the real positions."""
    per = F.binary_cross_entropy_with_logits(logits[..., :targets.shape[-1]], targets, reduction="none").mean(-1)
    return (per * mask).sum() / mask.sum()


def recognised(model: torch.nn.Module, name: str, strings: list[str]) -> float:
    """The share of ``strings`` whose every position's next-symbol set the model gets right."""
    hits = 0
    for start in range(0, len(strings), 64):
        part = strings[start:start + 64]
        targets, mask = encode_targets(name, part)
        logits = model(encode(name, part))[0][..., :targets.shape[-1]]
        hits += int(all_correct(logits, targets, mask).sum())
    return hits / len(strings)


def train_setting(model_type: str, name: str, sweep: FormalSweep,
                  on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one model on one language; its accuracy per length bin, final loss, size, time and
    whether a loss was non-finite (training stops there and scores what it has)."""
    spec = LANGUAGES[name]
    bins: list[Range] = [spec.train_range, *spec.test_bins]
    torch.manual_seed(sweep.seed)
    model = build_model(model_type, sweep.width, sweep.layers, max(b for _, b in bins), len(spec.alphabet) + 1)
    draws = random.Random(sweep.seed)

    def loss_of(step: int) -> Tensor:
        strings = sample_members(name, sweep.batch, spec.train_range, draws)
        targets, mask = encode_targets(name, strings)
        return char_loss(model(encode(name, strings))[0], targets, mask)

    outcome = train_from_scratch(model, loss_of, sweep.steps, sweep.lr, on_step)
    held = random.Random(10_000 + sweep.seed)
    with torch.no_grad():
        scores = [recognised(model, name, sample_members(name, sweep.test_examples, r, held)) for r in bins]
    return {"model": model_type, "language": name, "bins": [list(r) for r in bins], "accuracy": scores,
            **result_fields(model, outcome)}


def plot(results: list[dict[str, Any]]) -> bytes | None:
    """Accuracy per length bin, one panel per language, one line per model (PNG)."""
    plt = pyplot()
    if plt is None or not results:
        return None
    languages = list(dict.fromkeys(r["language"] for r in results))
    fig, axes = plt.subplots(1, len(languages), figsize=(3.2 * len(languages), 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], languages, strict=True):
        for r in (r for r in results if r["language"] == name):
            ax.plot(range(len(r["bins"])), r["accuracy"], marker="o", label=r["model"])
            ax.set_xticks(range(len(r["bins"])), [f"{a}-{b}" for a, b in r["bins"]], fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("string length (first: training range)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("strings recognised")
    axes[0][-1].legend(fontsize=8)
    return png_figure(fig, plt)


def sweep_and_save(sweep: FormalSweep, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Every model x language not yet in ``out_dir/eval/formal.json`` (resumable,
    ``synthetic.run_sweep``) and the plot beside it."""
    sweep.check()
    return sweep_models_by("formal", sweep, sweep.languages, "language",
                           lambda m, name, on_step: train_setting(m, name, sweep, on_step), plot, out_dir)
