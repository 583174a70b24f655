"""A run directory is never corrupted by a command that refuses or starts over: a refused resume
leaves it as it was, a fresh start moves the old run aside, unverifiable checkpoints are not
silently replaced, an unusable device writes nothing, and metrics.jsonl is strict JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from nestlearn import pipeline
from nestlearn.config import RunConfig
from nestlearn.train.checkpoint import list_checkpoints
from nestlearn.train.metrics import JsonlSink, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def short(cfg: RunConfig, **train: Any) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, **{"steps": 2, "ckpt_every": 2, "eval_every": 2, "log_every": 1, **train}))


def quiet(_: str) -> None:
    return None


def test_non_finite_metrics_are_written_as_null_and_read_as_nan(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"step": 1, "split": "train", "loss": math.nan, "grad_norm": math.inf, "lr": torch.tensor(0.5)})
    sink.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    assert json.loads(line, parse_constant=refuse) == {"step": 1, "split": "train", "loss": None,
                                                       "grad_norm": None, "lr": 0.5}
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"]) and record["lr"] == 0.5


def test_a_refused_resume_leaves_the_run_directory_as_it_was(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    cfg = short(tiny_cfg)
    run_dir, _ = pipeline.train(cfg, tiny_prepared, resume=None, log=quiet)
    before = {name: (run_dir / name).read_bytes() for name in ("config.json", "metrics.jsonl", "metrics.json")}
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32))
    with pytest.raises(ValueError, match=r"differs in model\.d_model; .* --resume none to start over"):
        pipeline.train(changed, tiny_prepared, resume="auto", log=quiet)
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_fresh_start_moves_the_old_run_aside(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    cfg = short(tiny_cfg)
    run_dir, _ = pipeline.train(cfg, tiny_prepared, resume=None, log=quiet)
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    messages: list[str] = []
    pipeline.train(short(cfg, steps=4, ckpt_every=4, eval_every=4), tiny_prepared, resume="none",
                   log=messages.append)
    (aside,) = run_dir.glob("superseded-*")
    assert any(str(aside) in m for m in messages)
    assert [p.name for p in list_checkpoints(aside / "checkpoints")] == ["step_000002"]
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_000004"]  # only the new run's
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]


def test_unverifiable_checkpoints_are_not_silently_replaced(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    cfg = short(tiny_cfg)
    run_dir, _ = pipeline.train(cfg, tiny_prepared, resume=None, log=quiet)
    (checkpoint,) = list_checkpoints(run_dir / "checkpoints")
    (checkpoint / "model.safetensors").write_bytes(b"torn")
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"none of the 1 checkpoints .* verifies .* --resume none"):
        pipeline.train(cfg, tiny_prepared, resume="auto", log=quiet)
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    pipeline.train(cfg, tiny_prepared, resume="none", log=quiet)  # told to: starts over, the old run aside
    assert len(list(run_dir.glob("superseded-*"))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unusable_device_writes_no_run_directory(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    cfg = short(tiny_cfg, device="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        pipeline.train(cfg, tiny_prepared, resume=None, log=quiet)
    assert not pipeline.run_dir_of(cfg).exists()
