"""What the evaluations trained from scratch share (MQAR, MAD, formal languages): a small model
of any registered type, the training loop, and the results file a sweep resumes from.

A sweep is a list of settings (model type, task, width, ...), each trained and scored on its
own. Its results file (``OUT_DIR/eval/<task>.json``) is rewritten after every setting, so a
stopped sweep picks up where it was; results are only reused under the same training settings.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from nestlearn import models
from nestlearn.config import load_config
from nestlearn.models.base import LanguageModel
from nestlearn.train.progress import Progress
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json, read_json

Result = dict[str, Any]


def check_settings(model_types: Sequence[str], widths: Sequence[int], **positive: float) -> None:
    """One-line errors for what every sweep shares: registered model types, widths that are
    multiples of 8 (heads of 32, or one head), and the named settings (steps, lr, ...) > 0."""
    unknown = [m for m in model_types if m not in models.available()]
    if unknown:
        raise ValueError(f"unknown model type(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(models.available())}")
    if min(widths, default=0) < 8 or any(w % 8 for w in widths):
        shown = widths[0] if len(widths) == 1 else list(widths)
        raise ValueError(f"width{'s' if len(widths) > 1 else ''} must be a multiple of 8, >= 8, got {shown}")
    bad = [f"{name} {value}" for name, value in positive.items() if not value > 0]
    if bad:
        raise ValueError(f"{', '.join(bad)}: expected > 0")


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


@dataclass(frozen=True)
class FromScratch:
    """Settings of a sweep over model types x tasks, one model of ``width`` each, trained for
    ``steps`` steps of ``batch`` examples at learning rate ``lr``, scored on ``test_examples``.
    ``AXES``: the fields that list what to train rather than how (not part of ``training``)."""

    AXES: ClassVar[tuple[str, ...]] = ("models",)
    models: tuple[str, ...] = ("transformer", "titans_mac", "hope")
    width: int = 64
    layers: int = 2
    steps: int = 400
    batch: int = 32
    lr: float = 1e-3
    test_examples: int = 100
    seed: int = 0

    def check_common(self, **positive: float) -> None:
        check_settings(self.models, [self.width], steps=self.steps, batch=self.batch, lr=self.lr,
                       test_examples=self.test_examples, **positive)

    def training(self) -> dict[str, Any]:
        """The settings a stored result must share to be reused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.AXES}


@dataclass(frozen=True)
class Outcome:
    """How training went: the last step's loss, whether every loss was finite (training stops
    at the first that is not), and the seconds it took."""

    final_loss: float
    finite: bool
    seconds: float


def train_from_scratch(model: LanguageModel, loss_of: Callable[[int], Tensor], steps: int, lr: float,
                       on_step: Callable[[int, float], None] | None = None) -> Outcome:
    """``steps`` steps of AdamW (no weight decay) on ``loss_of(step)``, the loss of that step's
    batch: linear warmup over the first 5%, then cosine to zero, gradient norm clipped to 1."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    start, loss_value = time.perf_counter(), math.nan
    model.train()
    for step in range(1, steps + 1):
        loss = loss_of(step)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return Outcome(loss_value, False, time.perf_counter() - start)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss_value)
    model.eval()
    return Outcome(loss_value, True, time.perf_counter() - start)


def scored_logits(model: LanguageModel, x: Tensor, targets: Tensor, ignore: int) -> tuple[Tensor, Tensor]:
    """Logits and targets at the scored positions only (``targets != ignore``). The output head
    is linear, so applying it to those positions' final hidden states gives their logits exactly;
    for MQAR (a few answers per sequence, vocabulary 8192) that skips most of the head's cost,
    which at width 64 is most of a training step."""
    head = model.lm_head
    model.register_module("lm_head", nn.Identity())  # forwards end in lm_head(norm(h)): now norm(h)
    try:
        hidden, _ = model(x)
    finally:
        model.register_module("lm_head", head)
    mask = targets != ignore
    logits: Tensor = head(hidden[mask])
    return logits, targets[mask]


def result_fields(model: LanguageModel, outcome: Outcome) -> Result:
    """What every setting's result reports besides its scores."""
    return {"final_loss": outcome.final_loss, "finite": outcome.finite,
            "params": sum(p.numel() for p in model.parameters()), "seconds": outcome.seconds}


@dataclass(frozen=True)
class Sweep:
    """A resumable sweep: ``task`` names the file (``eval/<task>.json``), ``training`` the
    settings a stored result must share to be reused, ``settings`` what to train (hashable keys
    such as (model, seq_len, width)), ``key`` a stored result's key, ``run`` trains and scores
    one setting (reporting each step's loss), ``steps`` per setting for the progress display."""

    task: str
    training: dict[str, Any]
    settings: list[Hashable]
    key: Callable[[Result], Hashable]
    run: Callable[[Hashable, Callable[[int, float], None]], Result]
    steps: int
    plot: Callable[[list[Result]], bytes | None]


def label(setting: Hashable) -> str:
    """A setting key as progress text: ``("hope", 64, 128)`` -> ``hope 64 128``."""
    return " ".join(map(str, setting)) if isinstance(setting, tuple) else str(setting)


def run_sweep(sweep: Sweep, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Every setting not already in ``out_dir/eval/<task>.json``, the file rewritten after each
    (and a PNG of ``sweep.plot`` beside it at the end); one progress display over all steps."""
    path = out_dir / "eval" / f"{sweep.task}.json"
    results: list[Result] = []
    if path.exists():
        stored = read_json(path)
        if stored.get("training") != sweep.training:
            raise ValueError(f"{path} holds results of other training settings ({stored.get('training')}); "
                             "give another --out-dir or the same settings")
        results = stored["results"]
    done = {sweep.key(r) for r in results}
    pending = [s for s in sweep.settings if s not in done]
    progress = Progress(len(pending) * sweep.steps, desc=sweep.task, every_seconds=30.0)

    def save() -> dict[str, Any]:
        blob = {"task": sweep.task, "training": sweep.training, "results": results,
                "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, blob)
        return blob

    for i, setting in enumerate(pending):
        def on_step(step: int, loss: float, i: int = i, name: str = label(setting)) -> None:
            progress.update(i * sweep.steps + step, setting=name, loss=loss)

        results.append(sweep.run(setting, on_step))
        save()
    progress.close()
    blob = save()
    png = sweep.plot(results)
    if png is not None:
        atomic_write_bytes(path.with_suffix(".png"), png)
    return path, blob


def sweep_models_by(task: str, sweep: FromScratch, names: Sequence[str], field: str,
                    train: Callable[[str, str, Callable[[int, float], None]], Result],
                    plot: Callable[[list[Result]], bytes | None], out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """``run_sweep`` over every model type x name (a task, a language: the results' ``field``),
    ``train(model_type, name, on_step)`` training and scoring one."""

    def run(setting: Hashable, on_step: Callable[[int, float], None]) -> Result:
        model_type, name = cast("tuple[str, str]", setting)
        return train(model_type, name, on_step)

    settings: list[Hashable] = [(m, name) for m in sweep.models for name in names]
    return run_sweep(Sweep(task, sweep.training(), settings, lambda r: (r["model"], r[field]), run, sweep.steps,
                           plot), out_dir)

