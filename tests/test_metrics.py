"""Metric sinks (JSONL resume semantics, optional backends) and the progress display."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from nestlearn.config.schema import LoggingConfig
from nestlearn.train.metrics import (
    JsonlSink,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    make_sinks,
    read_jsonl,
)
from nestlearn.train.progress import Progress, format_duration


def records(last: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for step in range(10, last + 1, 10):
        out.append({"step": step, "split": "train", "loss": 5.0 - step / 100, "lr": 1e-3})
        if step % 50 == 0:
            out.append({"step": step, "split": "val", "val_loss": 4.0, "val_ppl": 54.6})
    return out


def write_all(path: Path, recs: list[dict[str, Any]], resume_step: int | None = None) -> None:
    sink = JsonlSink(path, resume_step=resume_step)
    for rec in recs:
        sink.log(rec)
    sink.close()


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_lines_are_flushed_as_logged(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "sub" / "metrics.jsonl")
    sink.log({"step": 1, "split": "train", "loss": torch.tensor(2.5), "tokens": 4096})
    assert read_jsonl(tmp_path / "sub" / "metrics.jsonl") == [
        {"step": 1, "split": "train", "loss": 2.5, "tokens": 4096}
    ]
    sink.close()


def test_jsonl_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight.jsonl"
    write_all(straight, records(100))

    resumed = tmp_path / "resumed.jsonl"
    write_all(resumed, records(70))  # crashed at 70; the last checkpoint was at step 50
    with resumed.open("a") as fh:
        fh.write('{"step": 80, "split": "tr')  # and the crash cut a line short
    write_all(resumed, [r for r in records(100) if r["step"] > 50], resume_step=50)

    assert resumed.read_text() == straight.read_text()


def test_jsonl_fresh_start_discards_old_records(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    write_all(path, records(30))
    write_all(path, records(10))
    assert read_jsonl(path) == records(10)


def test_jsonl_resume_without_a_file_starts_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    write_all(path, records(20), resume_step=0)
    assert read_jsonl(path) == records(20)


def test_read_jsonl_tolerates_a_truncated_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1}\n{"step": 2')  # complete JSON without its newline is kept
    assert read_jsonl(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2}')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        read_jsonl(path)


# --- optional backends -----------------------------------------------------------------------


class FakeWriter:
    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.last = self

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def close(self) -> None:
        self.closed = True

    last: FakeWriter


def test_tensorboard_sink_tags_numeric_fields_by_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    sink = TensorBoardSink(tmp_path / "tb", resume_step=40)
    sink.log(
        {
            "step": 50,
            "split": "val",
            "val_loss": 3.5,
            "val_bpb": torch.tensor(1.25),
            "note": "text",
            "finite": True,
        }
    )
    sink.close()
    writer = FakeWriter.last
    assert writer.purge_step == 40 and writer.closed
    assert writer.scalars == [("val/val_loss", 3.5, 50), ("val/val_bpb", 1.25, 50)]


def test_wandb_sink_is_offline_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {"log": []}

    class FakeRun:
        def log(self, data: dict[str, float], step: int) -> None:
            calls["log"].append((data, step))

        def finish(self) -> None:
            calls["finished"] = True

    def init(**kwargs: Any) -> FakeRun:
        calls["init"] = kwargs
        calls["mode"] = os.environ.get("WANDB_MODE")
        return FakeRun()

    module = types.ModuleType("wandb")
    module.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = WandbSink("proj", "run1", {"seed": 0}, tmp_path)
    sink.log({"step": 10, "split": "train", "loss": 3.0, "lr": 1e-3})
    sink.close()
    assert calls["mode"] == "offline"
    assert calls["init"] == {
        "project": "proj",
        "name": "run1",
        "config": {"seed": 0},
        "dir": str(tmp_path),
    }
    assert calls["log"] == [({"train/loss": 3.0, "train/lr": 1e-3}, 10)]
    assert calls["finished"]


def test_wandb_mode_set_by_user_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError):
        WandbSink("proj", "run1", {}, tmp_path)
    assert os.environ["WANDB_MODE"] == "online"


@pytest.mark.parametrize(
    ("module", "field", "extra"),
    [
        ("torch.utils.tensorboard", "tensorboard", "nestlearn[tensorboard]"),
        ("wandb", "wandb", "nestlearn[wandb]"),
    ],
)
def test_missing_backend_names_the_extra_and_touches_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, field: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = LoggingConfig(**{field: True})
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")) as info:
        make_sinks(cfg, tmp_path, "run", {}, resume_step=None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_make_sinks_default_is_jsonl_only(tmp_path: Path) -> None:
    with make_sinks(LoggingConfig(), tmp_path, "run", {}, resume_step=None) as sinks:
        assert [type(s) for s in sinks.sinks] == [JsonlSink]
        sinks.log({"step": 1, "split": "train", "loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 1.0}]


def test_multisink_closes_every_sink_even_if_one_fails() -> None:
    closed: list[str] = []

    class Sink:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail
            self.logged: list[dict[str, Any]] = []

        def log(self, record: dict[str, Any]) -> None:
            self.logged.append(record)

        def close(self) -> None:
            closed.append(self.name)
            if self.fail:
                raise OSError(f"{self.name} failed")

    a, b = Sink("a", fail=True), Sink("b", fail=False)
    multi = MultiSink([a, b])
    multi.log({"step": 1})
    assert a.logged == b.logged == [{"step": 1}]
    with pytest.raises(OSError, match="a failed"):
        multi.close()
    assert closed == ["a", "b"]


# --- progress --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_duration() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(42.4) == "42s"
    assert format_duration(62) == "1m02s"
    assert format_duration(3 * 3600 + 5 * 60 + 9) == "3h05m09s"
    assert format_duration(float("inf")) == "?"
    assert format_duration(-1) == "?"


def test_lines_mode_every_k_steps(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    progress = Progress(30, "lines", desc="train", every_steps=10, every_seconds=0, clock=clock)
    for step in range(1, 31):
        clock.now += 1.0
        progress.update(step, loss=3.2104, lr=1e-3, tokens_per_s=5120.4)
    progress.close()
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines == [
        "train step 10/30 | loss 3.21 | lr 1.00e-03 | 5,120 tok/s | eta 20s",
        "train step 20/30 | loss 3.21 | lr 1.00e-03 | 5,120 tok/s | eta 10s",
        "train step 30/30 | loss 3.21 | lr 1.00e-03 | 5,120 tok/s | eta 0s",
    ]
    assert out.err == ""


def test_lines_mode_stays_on_multiples_of_k_after_a_resume(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(40, "lines", initial=15, every_steps=10, every_seconds=0, clock=FakeClock())
    for step in range(16, 41):
        progress.update(step, loss=1.0)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [f"train step {s}/40" for s in (20, 30, 40)]


def test_lines_mode_rate_limited_by_time_from_a_resumed_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock()
    progress = Progress(200, "lines", initial=100, every_seconds=30, clock=clock)
    for step in range(101, 111):
        clock.now += 7.0  # a line at most every 30 s: after steps 105 and 110 (35 s each)
        progress.update(step, loss=2.0, grad_norm=0.91234)
    progress.update(111, loss=1.9)  # held back, printed by close()
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "train step 105/200",
        "train step 110/200",
        "train step 111/200",
    ]
    assert lines[0] == "train step 105/200 | loss 2 | grad_norm 0.9123 | eta 11m05s"


def test_none_mode_prints_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(10, "none", every_steps=1)
    for step in range(1, 11):
        progress.update(step, loss=1.0)
    progress.close()
    assert capsys.readouterr() == ("", "")
    progress.write("saved checkpoint")
    assert capsys.readouterr().out == "saved checkpoint\n"


def test_auto_mode_without_a_terminal_uses_lines(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(5, "auto", every_steps=1)
    assert progress.mode == "lines"
    progress.update(1, loss=1.0, tok_s=12345.6)
    progress.write("hello")
    progress.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step 1/5 | loss 1 | 12,346 tok/s | eta ") and out[1] == "hello"


def test_bar_mode_draws_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(4, "bar", desc="eval") as progress:
        for step in range(1, 5):
            progress.update(step, loss=2.5)
        progress.write("a message")
    out = capsys.readouterr()
    assert "a message" in out.out
    assert "eval" in out.err and "4/4" in out.err and "loss 2.5" in out.err


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        Progress(10, "fancy")  # type: ignore[arg-type]
