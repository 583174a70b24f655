"""Continual learning (``eval.continual``): the transfer metrics on a hand-made loss matrix, the
segments file, the ``stdlib:<package>`` source, and a tiny two-segment study end to end that
resumes without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nestlearn import cli
from nestlearn.config import RunConfig
from nestlearn.data.corpus import open_source, stdlib_root
from nestlearn.data.errors import DataError
from nestlearn.eval.continual import Segment, read_segments, run_continual, transfer_metrics
from nestlearn.train.checkpoint import OPTIMIZER_FILE, checkpoint_dir_name

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = (Segment("json", ("stdlib:json",)), Segment("concurrent", ("stdlib:concurrent",)))


def adam_steps(run_dir: Path, step: int) -> int:
    """AdamW's step count in a segment's checkpoint: the steps its moments have seen."""
    saved = torch.load(run_dir / "checkpoints" / checkpoint_dir_name(step) / OPTIMIZER_FILE, weights_only=True)
    return int(next(iter(saved["optimizer"]["state"].values()))["step"])


def test_transfer_metrics_of_a_hand_made_matrix() -> None:
    untrained = [5.0, 5.0, 5.0]
    matrix = [[2.0, 4.0, 4.5],   # after segment 0
              [3.0, 2.0, 3.5],   # after segment 1
              [3.5, 2.5, 1.5]]   # after segment 2
    m = transfer_metrics(matrix, untrained)
    assert m["average_final_loss"] == pytest.approx((3.5 + 2.5 + 1.5) / 3)
    assert m["forgetting"] == pytest.approx(((3.5 - 2.0) + (2.5 - 2.0)) / 2)
    assert m["backward_transfer"] == pytest.approx(((2.0 - 3.5) + (2.0 - 2.5)) / 2)
    assert m["forward_transfer"] == pytest.approx(((5.0 - 4.0) + (5.0 - 3.5)) / 2)
    with pytest.raises(ValueError, match="square loss matrix"):
        transfer_metrics([[1.0, 2.0]], [1.0, 1.0])


def test_segments_file_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("segments:\n  - {name: a, sources: [stdlib:json]}\n  - {name: b, sources: [x.txt, y.txt]}\n")
    assert read_segments(good) == (Segment("a", ("stdlib:json",)), Segment("b", ("x.txt", "y.txt")))
    for text, message in [("segments: [{name: a, sources: [s]}]", "at least two"),
                          ("segments: [{name: a, sources: [s]}, {name: b}]", "segment 1"),
                          ("segments: [{name: a, sources: [s]}, {name: a, sources: [t]}]", "repeat")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_segments(bad)


def test_a_stdlib_package_source_holds_only_that_package() -> None:
    source = open_source("stdlib:json")
    assert source.files and all(p.relative_to(stdlib_root()).parts[0] == "json" for p in source.files)
    assert {d.doc_id for d in source.documents()} >= {"json/decoder.py", "json/encoder.py"}
    with pytest.raises(DataError, match="no top-level package or module 'nope'"):
        open_source("stdlib:nope")


def test_two_segments_end_to_end_and_resumed(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, name="cl", train=dataclasses.replace(
        tiny_cfg.train, steps=30, eval_every=30, ckpt_every=30))
    path, blob = run_continual(cfg, TWO, log=lambda _: None)
    assert path == Path(cfg.out_dir) / "cl" / "eval" / "continual.json" and path.with_suffix(".png").exists()
    matrix, untrained = blob["matrix"], blob["untrained"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][0] < untrained[0] - 0.5 and matrix[1][1] < untrained[1] - 0.5  # each segment learned
    assert blob["metrics"] == pytest.approx(transfer_metrics(matrix, untrained))
    runs = sorted(p.name for p in (Path(cfg.out_dir) / "cl" / "continual").iterdir())
    assert runs == ["00_json", "01_concurrent"]
    assert adam_steps(Path(cfg.out_dir) / "cl" / "continual" / "01_concurrent", 30) == 60  # carried over
    lines = (Path(cfg.out_dir) / "cl" / "continual" / "01_concurrent" / "metrics.jsonl").read_text().count("\n")
    _, again = run_continual(cfg, TWO, log=lambda _: None)  # both finished: loaded, not retrained
    assert again["untrained"] == untrained
    for row, before in zip(again["matrix"], matrix, strict=True):
        assert row == pytest.approx(before, abs=1e-6)
    assert (Path(cfg.out_dir) / "cl" / "continual" / "01_concurrent" / "metrics.jsonl").read_text().count("\n") == lines


def test_the_cli_runs_a_segments_file(tiny_cfg: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    segments = tmp_path / "segments.yaml"
    segments.write_text("segments:\n  - {name: json, sources: [stdlib:json]}\n"
                        "  - {name: concurrent, sources: [stdlib:concurrent]}\n")
    overrides = [f"data.artifacts_dir={tiny_cfg.data.artifacts_dir}", "data.max_chars_per_source=400000",
                 "data.tokenizer.vocab_size=512", "data.tokenizer.max_sentences=20000", "model.d_model=32",
                 "model.n_layers=1", "model.n_heads=2", "train.batch_size=4", "train.seq_len=32", "train.steps=3",
                 "train.eval_every=3", "train.eval_batches=2", "train.ckpt_every=3", "logging.progress=none",
                 f"out_dir={tmp_path / 'runs'}", "name=cl_cli"]
    args = ["eval", "continual", "-c", "transformer/pilot_smoke", *overrides, "--segments", str(segments),
            "--reset-optimizer"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "forgetting" in out and "results:" in out
    stored = json.loads((tmp_path / "runs" / "cl_cli" / "eval" / "continual.json").read_text())
    assert stored["reset_optimizer"] is True and [s["name"] for s in stored["segments"]] == ["json", "concurrent"]
    assert adam_steps(tmp_path / "runs" / "cl_cli" / "continual" / "01_concurrent", 3) == 3  # reset
    assert cli.main(["report", str(tmp_path / "runs" / "cl_cli")]) == 0
    page = (tmp_path / "runs" / "cl_cli" / "report.html").read_text()
    assert "<h2>continual</h2>" in page and "forgetting" in page and "untrained" in page
    assert cli.main([*args[:-3], "--segments", str(tmp_path / "missing.yaml")]) != 0
    assert "missing.yaml" in capsys.readouterr().err
