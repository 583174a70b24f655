"""Metric sinks: every record goes to `metrics.jsonl`; TensorBoard and W&B are opt-in extras.

Records are flat dicts with a "step" and a "split" ("train", "val", ...). The JSONL file is
the source of truth for reports, so a resumed run rewrites it to end at the resumed step and
then appends: the file equals that of an uninterrupted run, apart from timing fields.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from nestlearn.config.schema import LoggingConfig
from nestlearn.utils.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    """Let 0-d tensors and NumPy scalars be logged as the numbers they hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metric value of type {type(value).__name__} is not JSON-serialisable")


def _finite_or_none(value: Any) -> Any:
    value = _plain(value) if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _dumps(record: dict[str, Any]) -> str:
    """One JSON line; a non-finite number (a diverged loss) is written as null, since JSON has
    no NaN or infinity (``read_jsonl`` reads it back as NaN)."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, default=_plain, allow_nan=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a last line cut short by a crash is dropped, not an error; null
    (a non-finite number, ``_dumps``) comes back as NaN."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from exc
        records.append({k: math.nan if v is None else v for k, v in record.items()})
    return records


class JsonlSink:
    """Appends one JSON object per line, flushed at once so a crash loses at most one line.

    `resume_step=None` starts the file afresh; `resume_step=s` first keeps only the records
    with step <= s (rewritten atomically), dropping those a crashed run logged after its
    last checkpoint.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives with the sink)

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(_dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """The step and the numeric fields of a record, tagged "split/key"."""
    split = record.get("split", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        number = _plain(value) if hasattr(value, "item") else value
        if isinstance(number, int | float) and not isinstance(number, bool):
            out[f"{split}/{key}"] = float(number)
    return int(record["step"]), out


class TensorBoardSink:
    """Scalars for TensorBoard; on resume, events after `resume_step` are purged."""

    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "logging.tensorboard=true needs TensorBoard: pip install 'nestlearn[tensorboard]'"
            ) from exc
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        step, scalars = _scalars(record)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Weights & Biases, offline unless WANDB_MODE says otherwise (runs never need a network)."""

    def __init__(self, project: str, run_name: str, config: dict[str, Any], run_dir: Path) -> None:
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(
                "logging.wandb=true needs wandb: pip install 'nestlearn[wandb]'"
            ) from exc
        self._run = wandb.init(project=project, name=run_name, config=config, dir=str(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        step, scalars = _scalars(record)
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiSink:
    """Fans records out to several sinks; closing closes all of them even if one fails."""

    def __init__(self, sinks: Sequence[MetricSink]) -> None:
        self.sinks = list(sinks)

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        errors: list[BaseException] = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> MultiSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def make_sinks(
    cfg: LoggingConfig,
    run_dir: Path,
    run_name: str,
    config: dict[str, Any],
    resume_step: int | None,
) -> MultiSink:
    """`run_dir/metrics.jsonl` always, plus `run_dir/tensorboard` and W&B when enabled.

    The optional sinks are opened first, so a missing extra fails before the JSONL is touched.
    """
    run_dir = Path(run_dir)
    extras: list[MetricSink] = []
    if cfg.tensorboard:
        extras.append(TensorBoardSink(run_dir / "tensorboard", resume_step))
    if cfg.wandb:
        extras.append(WandbSink(cfg.wandb_project, run_name, config, run_dir))
    return MultiSink([JsonlSink(run_dir / METRICS_FILE, resume_step), *extras])
