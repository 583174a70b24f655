"""End-to-end training: learning, exact resume, interrupted runs, and the `run` main job."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_overrides
from nestlearn import pipeline
from nestlearn.config import RunConfig, load_config
from nestlearn.train.metrics import read_jsonl
from nestlearn.train.trainer import Trainer

QUIET = lambda _msg: None  # noqa: E731


def with_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def train_losses(cfg: RunConfig, data: Any, resume: str | None) -> list[float]:
    cfg = pipeline.with_vocab(cfg, data)
    from nestlearn import models
    from nestlearn.utils.seeding import seed_everything

    seed_everything(cfg.seed)
    model = models.build(cfg.model)
    trainer = Trainer(cfg, model, data, pipeline.run_dir_of(cfg), resume=resume, log=QUIET)
    trainer.fit()
    return trainer.losses


def test_tiny_model_learns_below_unigram_entropy(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    run_dir, final = pipeline.train(tiny_cfg, tiny_prepared, resume=None, log=QUIET)
    entropy = tiny_prepared.stats["unigram_entropy_nats"]
    assert final["step"] == tiny_cfg.train.steps
    assert final["val_loss"] < entropy - 0.4, (final["val_loss"], entropy)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert train[-1] < train[0]
    assert [r["step"] for r in records if r["split"] == "val"] == [100, 200]
    assert (run_dir / "checkpoints" / "step_000200" / "model.safetensors").is_file()


def test_hope_pilot_smoke_learns_the_default_corpus(tiny_root: Path, tiny_prepared: Any,
                                                   tmp_path: Path) -> None:
    """The HOPE smoke config (self-referential Titans -> CMS on level clocks), scaled down to
    the tiny shapes, learns the default corpus well below its unigram entropy in 100 steps."""
    cfg = load_config("hope/pilot_smoke", [
        *tiny_overrides(tiny_root), f"out_dir={tmp_path / 'runs'}", "train.steps=100",
        "train.batch_size=8", "train.eval_every=100", "train.ckpt_every=100"])
    assert cfg.model.type == "hope" and cfg.optimizer.type == "chunked"
    run_dir, final = pipeline.train(cfg, tiny_prepared, resume=None, log=QUIET)
    entropy = tiny_prepared.stats["unigram_entropy_nats"]
    assert final["val_loss"] < entropy - 0.25, (final["val_loss"], entropy)
    train = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1] < train[0] - 0.4  # the first record is step 10 (log_every)


def test_resume_reproduces_the_uninterrupted_loss_sequence(tiny_cfg: RunConfig,
                                                           tiny_prepared: Any) -> None:
    cfg = with_train(tiny_cfg, steps=8, ckpt_every=4, eval_every=4, keep_checkpoints=0,
                     log_every=1)
    full = train_losses(cfg, tiny_prepared, resume=None)
    ckpts = pipeline.run_dir_of(cfg) / "checkpoints"
    # A second run directory holding only the step-4 checkpoint continues from there.
    other = dataclasses.replace(cfg, name="resumed")
    target = pipeline.run_dir_of(other) / "checkpoints" / "step_000004"
    shutil.copytree(ckpts / "step_000004", target)
    resumed = train_losses(other, tiny_prepared, resume="auto")
    assert resumed == full[4:]  # bit-for-bit, not approximately


def test_crash_then_resume_matches_uninterrupted(tiny_cfg: RunConfig, tiny_prepared: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = with_train(tiny_cfg, steps=6, ckpt_every=2, eval_every=3, log_every=1)
    reference = train_losses(dataclasses.replace(cfg, name="reference"), tiny_prepared, None)

    original = Trainer._train_step
    calls = {"n": 0}

    def crashing(self: Trainer) -> tuple[float, float]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_losses(cfg, tiny_prepared, None)
    monkeypatch.setattr(Trainer, "_train_step", original)
    rest = train_losses(cfg, tiny_prepared, "auto")
    assert rest == reference[2:]  # restarted from step 2 (the newest checkpoint)
    records = read_jsonl(pipeline.run_dir_of(cfg) / "metrics.jsonl")
    ref_records = read_jsonl(pipeline.run_dir_of(dataclasses.replace(cfg, name="reference"))
                             / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}  # noqa: E731
                        for r in rs]
    assert strip(records) == strip(ref_records)


def test_resume_refuses_a_changed_model(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    cfg = with_train(tiny_cfg, steps=2, ckpt_every=2, eval_every=2)
    train_losses(cfg, tiny_prepared, None)
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=3))
    with pytest.raises(ValueError, match="model"):
        train_losses(changed, tiny_prepared, "auto")


def test_cli_run_writes_report(tiny_root: Path, tiny_prepared: Any, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    overrides = [*tiny_overrides(tiny_root), f"out_dir={tmp_path}", "train.steps=10",
                 "train.eval_every=5", "train.ckpt_every=5"]
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "run", "-c",
                           "transformer/pilot_smoke", *overrides],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "tiny"
    assert f"report: {run_dir / 'report.html'}" in proc.stdout
    for name in ("metrics.jsonl", "metrics.json", "config.json", "loss.png", "report.html",
                 "data_stats.json", "tokenizer.model", "samples.json"):
        assert (run_dir / name).is_file(), name
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "val_loss" in html and "<h2>Samples</h2>" in html
    samples = json.loads((run_dir / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == list(pipeline.SAMPLE_PROMPTS)
    assert all(s["text"] for s in samples)
    sample = subprocess.run([sys.executable, "-m", "nestlearn", "sample", str(run_dir), "--prompt",
                             "def ", "--max-new-tokens", "70", "--temperature", "0"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.startswith("def ") and len(sample.stdout) > len("def \n")
    assert "step_000010" in sample.stderr
    assert "passes the 64 tokens this model was trained on" in sample.stderr  # train.seq_len 64
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["step"] == 10 and final["val_loss"] > 0
    # Running again resumes at the end: no retraining, same figures, report rewritten.
    again = subprocess.run([sys.executable, "-m", "nestlearn", "run", "-c",
                            "transformer/pilot_smoke", *overrides],
                           capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["val_loss"] == pytest.approx(
        final["val_loss"])


def test_cli_bad_source_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "prepare",
                           f"data.sources=[{tmp_path / 'missing.txt'}]",
                           f"data.artifacts_dir={tmp_path}"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.txt" in lines[0], proc.stderr


def test_cli_run_compare_trains_baselines_on_the_same_budget(tiny_root: Path, tiny_prepared: Any,
                                                              tmp_path: Path) -> None:
    from conftest import tiny_overrides

    overrides = [*tiny_overrides(tiny_root), f"out_dir={tmp_path}", "train.steps=4",
                 "train.eval_every=4", "train.ckpt_every=4", "train.eval_batches=1"]
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "run", "-c",
                           "transformer/pilot_smoke", "--compare", "titans_mac", *overrides],
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = tmp_path / "tiny__titans_mac"
    assert json.loads((other / "config.json").read_text())["model"]["type"] == "titans_mac"
    main_final = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    other_final = json.loads((other / "metrics.json").read_text())
    assert main_final["tokens"] == other_final["tokens"]  # the same token budget
    html = (tmp_path / "tiny" / "report.html").read_text()
    assert "Comparison" in html and "tiny__titans_mac" in html
    assert (tmp_path / "tiny" / "compare.png").is_file()


def test_cli_compare_rejects_an_unknown_entry(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "run", "--compare", "lstm",
                           f"out_dir={tmp_path}"], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 2 and "'lstm'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_failed_comparison_run_is_reported_and_exits_non_zero(
        tiny_root: Path, tiny_prepared: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The comparison run ends with a NaN validation loss: the job still writes both reports,
    marks that run FAILED, and exits 1 with one line naming it."""
    from conftest import tiny_overrides
    from nestlearn import cli

    evaluate = Trainer.evaluate

    def nan_for_titans(self: Trainer) -> dict[str, float]:
        figures = evaluate(self)
        if self.cfg.model.type == "titans_mac":
            figures = {k: float("nan") for k in figures}
        return figures

    monkeypatch.setattr(Trainer, "evaluate", nan_for_titans)
    overrides = [*tiny_overrides(tiny_root), f"out_dir={tmp_path}", "train.steps=2",
                 "train.eval_every=2", "train.ckpt_every=2", "train.eval_batches=1"]
    code = cli.main(["run", "-c", "transformer/pilot_smoke", "--compare", "titans_mac", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == ("nestlearn: error: 1 run(s) failed: tiny__titans_mac (the final validation "
                       "loss is nan)")
    failed = json.loads((tmp_path / "tiny__titans_mac" / "metrics.json").read_text())
    assert failed["failed"] == "the final validation loss is nan"
    html = (tmp_path / "tiny" / "report.html").read_text()
    assert "FAILED: the final validation loss is nan" in html and "<td>ok</td>" in html


def test_a_diverged_run_keeps_its_metrics_and_the_train_command_exits_1(
        tiny_root: Path, tiny_prepared: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_overrides
    from nestlearn import cli
    from nestlearn.train.trainer import TrainingDiverged

    def diverge(self: Trainer) -> dict[str, Any]:
        raise TrainingDiverged("5 consecutive non-finite losses at step 3; lower optimizer.lr")

    monkeypatch.setattr(Trainer, "fit", diverge)
    code = cli.main(["train", "-c", "transformer/pilot_smoke", *tiny_overrides(tiny_root),
                     f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("nestlearn: error: run tiny failed: 5 consecutive non-finite losses")
    final = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert final["failed"].startswith("5 consecutive") and final["step"] == 0


def test_the_default_run_compares_with_the_transformer_baseline() -> None:
    from nestlearn.cli import DEFAULT_CONFIG, _compare

    assert _compare(None, DEFAULT_CONFIG) == "transformer"
    assert _compare(None, "titans/pilot_smoke") == ""
    assert _compare("none", DEFAULT_CONFIG) == ""
    assert _compare("titans_mac", DEFAULT_CONFIG) == "titans_mac"
