"""Continual learning: train one model on a sequence of data segments in turn and, after each,
evaluate it on every segment, the protocol of the papers' continual-learning claims.

Segments are lists of data sources (default: top-level packages of the default corpus, e.g.
``stdlib:email`` -> ``stdlib:asyncio`` -> ...), all tokenized with one tokenizer trained on their
union; each holds out ``val_fraction`` of its files (default 0.2: a package has 20-35 files, and
the corpus-wide 5% leaves some with none). Each segment trains for ``train.steps`` steps of the run's config (model, optimizer, level
clocks, schedule: warmup and decay restart per segment, as a new task would) on the same model;
the optimizer's state (moments, the deep optimizers' memories) carries over unless
``reset_optimizer``. Every segment is its own ``nestlearn`` run directory under
``RUN/continual/``, so a stopped study resumes and a finished segment is loaded, not retrained.

The loss matrix L[i][j] is the validation loss (nats/token) on segment j after training on
segments 0..i, with a row ``b`` for the untrained model. From it, with T segments (losses, so
every sign is chosen so that positive means better for the model or worse for forgetting):

- average final loss: mean_j L[T-1][j];
- forgetting (Chaudhry et al. 2018, for losses): mean over j < T-1 of
  L[T-1][j] - min_{j<=i<T-1} L[i][j], how far each earlier segment fell from its best;
- backward transfer (Lopez-Paz & Ranzato 2017, GEM, for losses): mean over j < T-1 of
  L[j][j] - L[T-1][j] (negative: later training hurt earlier segments);
- forward transfer (GEM): mean over j > 0 of b[j] - L[j-1][j], what the earlier segments did
  for a segment before it was trained on.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from nestlearn import models
from nestlearn.config import RunConfig
from nestlearn.config.loader import to_dict
from nestlearn.data import PreparedData, iter_eval_batches, prepare_data
from nestlearn.eval.perplexity import evaluate_lm
from nestlearn.eval.report import png_figure, pyplot
from nestlearn.pipeline import with_vocab
from nestlearn.train.trainer import Trainer
from nestlearn.utils.device import resolve_device
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json
from nestlearn.utils.seeding import seed_everything

CONTINUAL_FILE = Path("eval") / "continual.json"


@dataclass(frozen=True)
class Segment:
    """One stage of the sequence: a name and its data sources (any ``data.sources`` entries)."""

    name: str
    sources: tuple[str, ...]


DEFAULT_SEGMENTS = tuple(Segment(p, (f"stdlib:{p}",)) for p in ("email", "asyncio", "tkinter", "multiprocessing", "xml"))


def read_segments(path: Path) -> tuple[Segment, ...]:
    """Segments from YAML: ``segments: [{name: email, sources: [stdlib:email]}, ...]``."""
    blob = yaml.safe_load(path.read_text(encoding="utf-8"))
    items = blob.get("segments") if isinstance(blob, dict) else None
    if not isinstance(items, list) or len(items) < 2:
        raise ValueError(f"{path}: expected 'segments:' with a list of at least two {{name, sources}} entries")
    segments = []
    for i, item in enumerate(items):
        sources = item.get("sources") if isinstance(item, dict) else None
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(sources, list)
                and sources and all(isinstance(s, str) for s in sources)):
            raise ValueError(f"{path}: segment {i} is {item!r}; expected {{name: <text>, sources: [<source>, ...]}}")
        segments.append(Segment(item["name"], tuple(sources)))
    names = [s.name for s in segments]
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: segment names repeat ({names}); each must be unique")
    return tuple(segments)


def transfer_metrics(matrix: Sequence[Sequence[float]], untrained: Sequence[float]) -> dict[str, float]:
    """Average final loss, forgetting, backward and forward transfer (module docstring) of a
    T x T loss matrix (row i: after training on segments 0..i) and the untrained row."""
    t = len(matrix)
    if t < 2 or any(len(row) != t for row in matrix) or len(untrained) != t:
        raise ValueError(f"expected a square loss matrix of >= 2 segments and {t} untrained losses")
    last = matrix[-1]
    earlier = range(t - 1)
    return {
        "average_final_loss": statistics.fmean(last),
        "forgetting": statistics.fmean(last[j] - min(matrix[i][j] for i in range(j, t - 1)) for j in earlier),
        "backward_transfer": statistics.fmean(matrix[j][j] - last[j] for j in earlier),
        "forward_transfer": statistics.fmean(untrained[j] - matrix[j - 1][j] for j in range(1, t)),
    }


def prepare_segments(cfg: RunConfig, segments: Sequence[Segment], val_fraction: float, progress: bool,
                     log: Callable[[str], None]) -> list[PreparedData]:
    """Each segment's shards, all with one tokenizer trained on the union of their sources."""
    data = dataclasses.replace(cfg.data, weights=None, val_fraction=val_fraction)
    data.check("continual data")
    union = prepare_data(dataclasses.replace(data, sources=[s for seg in segments for s in seg.sources]),
                         progress=progress, log=log)
    shared = dataclasses.replace(data.tokenizer, path=str(union.tokenizer_path))
    return [prepare_data(dataclasses.replace(data, sources=list(seg.sources), tokenizer=shared),
                         progress=progress, log=log) for seg in segments]


def _losses(model: torch.nn.Module, data: list[PreparedData], cfg: RunConfig, device: torch.device) -> list[float]:
    """The validation loss on every segment (``train.eval_batches`` batches each)."""
    t = cfg.train
    return [evaluate_lm(model, iter_eval_batches(d, "val", t.batch_size, t.seq_len, t.eval_batches),
                        float(d.stats["bytes_per_token"]["val"]), device, t.precision)["val_loss"] for d in data]


def run_continual(cfg: RunConfig, segments: Sequence[Segment] = DEFAULT_SEGMENTS, reset_optimizer: bool = False,
                  val_fraction: float = 0.2, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Train ``cfg`` on each segment in turn (module docstring); writes and returns
    ``RUN/eval/continual.json`` (matrix, untrained row, metrics, settings) and its plot."""
    if len(segments) < 2:
        raise ValueError(f"continual learning needs at least two segments, got {len(segments)}")
    run_dir = Path(cfg.out_dir) / cfg.name
    data = prepare_segments(cfg, segments, val_fraction, cfg.logging.progress != "none", log)
    cfg = with_vocab(cfg, data[0])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    model = models.build(cfg.model).to(device)
    untrained = _losses(model, data, cfg, device)
    matrix: list[list[float]] = []
    previous: Trainer | None = None
    for k, (segment, segment_data) in enumerate(zip(segments, data, strict=True)):
        seg_cfg = dataclasses.replace(cfg, name=f"{k:02d}_{segment.name}", out_dir=str(run_dir / "continual"),
                                      data=dataclasses.replace(cfg.data, sources=list(segment.sources),
                                                               val_fraction=val_fraction))
        trainer = Trainer(seg_cfg, model, segment_data, run_dir / "continual" / seg_cfg.name, resume="auto", log=log)
        if trainer.state.step == 0 and previous is not None and not reset_optimizer:
            fresh = [g["lr"] for g in trainer.optimizer.param_groups]  # this segment's schedule
            trainer.optimizer.load_state_dict(previous.optimizer.state_dict())
            for group, lr in zip(trainer.optimizer.param_groups, fresh, strict=True):
                group["lr"] = lr
        log(f"segment {k + 1}/{len(segments)}: {segment.name} ({', '.join(segment.sources)})")
        trainer.fit()
        matrix.append(_losses(trainer.model, data, cfg, device))
        log("  losses after it: " + ", ".join(f"{s.name} {x:.3f}" for s, x in zip(segments, matrix[-1], strict=True)))
        previous = trainer
    blob = {"task": "continual", "model": cfg.model.type, "config": to_dict(cfg),
            "segments": [dataclasses.asdict(s) for s in segments], "reset_optimizer": reset_optimizer,
            "val_fraction": val_fraction,
            "steps_per_segment": cfg.train.steps, "untrained": untrained, "matrix": matrix,
            "metrics": transfer_metrics(matrix, untrained), "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    path = run_dir / CONTINUAL_FILE
    atomic_write_json(path, blob)
    png = plot(blob)
    if png is not None:
        atomic_write_bytes(path.with_suffix(".png"), png)
    return path, blob


def plot(blob: dict[str, Any]) -> bytes | None:
    """Validation loss on each segment (one line each) against the training stage (PNG)."""
    plt = pyplot()
    if plt is None:
        return None
    names = [s["name"] for s in blob["segments"]]
    stages = ["untrained", *(f"after {n}" for n in names)]
    fig, ax = plt.subplots(figsize=(1.3 * len(stages) + 2, 3.6))
    for j, name in enumerate(names):
        ax.plot(range(len(stages)), [blob["untrained"][j], *(row[j] for row in blob["matrix"])], marker="o", label=name)
    ax.set_xticks(range(len(stages)), stages, fontsize=8, rotation=20)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"continual learning: {blob['model']}")
    ax.legend(fontsize=8, title="segment")
    return png_figure(fig, plt)
