"""MAD and formal languages trained from scratch (``eval.mad_train``, ``eval.formal_train``): the
causal compression layout, a tiny model that learns within the test, every model type end to
end, a sweep that resumes, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from nestlearn import cli, models
from nestlearn.eval import formal_train, mad_train
from nestlearn.eval.mad import TASKS
from nestlearn.eval.mqar import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MAD = mad_train.MADSweep(width=16, steps=2, batch=4, max_seq_len=40, test_examples=8)
TINY_FORMAL = formal_train.FormalSweep(width=16, steps=2, batch=4, test_examples=4)


def test_causal_compression_asks_for_the_sequence_after_the_compression_token() -> None:
    inputs = torch.tensor([[3, 1, 4, 9]])  # three tokens, then the compression token 9
    stream, targets = mad_train.causal_compression(inputs, blank=10)
    assert stream.tolist() == [[3, 1, 4, 9, 10, 10]]
    assert targets.tolist() == [[IGNORE, IGNORE, IGNORE, 3, 1, 4]]


def test_a_tiny_model_memorises_the_mapping() -> None:
    """MAD's memorization (256 keys' fixed values): chance is 1/128 before training, all right
    after 150 steps of width 32."""
    easy = mad_train.MADSweep(width=32, steps=150, batch=32, lr=3e-3)
    trained = mad_train.train_setting("transformer", "memorization", easy)
    assert trained["finite"] and trained["accuracy"] > 0.9, trained
    untrained = mad_train.train_setting("transformer", "memorization", dataclasses.replace(easy, steps=1))
    assert untrained["accuracy"] < 0.1


def test_a_tiny_model_learns_anbn_in_its_training_range() -> None:
    """aⁿbⁿ character prediction: no string recognised before training; within the training
    lengths after 200 steps (longer strings are the generalisation test, not asserted)."""
    easy = formal_train.FormalSweep(width=32, steps=200, batch=16, lr=3e-3, test_examples=40)
    trained = formal_train.train_setting("transformer", "anbn", easy)
    assert trained["bins"][0] == [2, 100] and trained["accuracy"][0] > 0.9, trained
    untrained = formal_train.train_setting("transformer", "anbn", dataclasses.replace(easy, steps=1))
    assert untrained["accuracy"][0] < 0.1


@pytest.mark.parametrize("model_type", models.available())
def test_every_model_type_runs_every_task(model_type: str) -> None:
    for name in TASKS:
        r = mad_train.train_setting(model_type, name, TINY_MAD)
        assert r["finite"] and math.isfinite(r["final_loss"]) and 0 <= r["accuracy"] <= 1, (name, r)
    for name in ("parity", "shuffle2"):
        r = formal_train.train_setting(model_type, name, TINY_FORMAL)
        assert r["finite"] and len(r["accuracy"]) == 3 and all(0 <= a <= 1 for a in r["accuracy"]), (name, r)


def test_sweeps_resume_and_refuse_other_settings(tmp_path: Path) -> None:
    quick = dataclasses.replace(TINY_FORMAL, models=("transformer",), languages=("aa_star",))
    path, blob = formal_train.sweep_and_save(quick, tmp_path)
    assert path == tmp_path / "eval" / "formal.json" and len(blob["results"]) == 1
    _, again = formal_train.sweep_and_save(dataclasses.replace(quick, languages=("aa_star", "anbn")), tmp_path)
    assert again["results"][0] == blob["results"][0]  # kept, not retrained
    assert [r["language"] for r in again["results"]] == ["aa_star", "anbn"]
    with pytest.raises(ValueError, match="other training settings"):
        formal_train.sweep_and_save(dataclasses.replace(quick, steps=3), tmp_path)


@pytest.mark.parametrize("bad", [{"tasks": ("recall",)}, {"width": 12}, {"models": ("nope",)},
                                 {"max_seq_len": 20, "tasks": ("selective_copying",)}])
def test_bad_mad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(TINY_MAD, **bad).check()  # type: ignore[arg-type]


def test_the_cli_trains_both_and_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--models", "transformer", "--width", "16", "--steps", "2", "--batch", "4", "--test-examples", "4",
              "--out-dir", str(tmp_path)]
    assert cli.main(["eval", "mad", *common, "--tasks", "memorization,compression"]) == 0
    out = capsys.readouterr().out
    assert "memorization" in out and f"results: {tmp_path / 'eval' / 'mad.json'}" in out
    stored = json.loads((tmp_path / "eval" / "mad.json").read_text())
    assert [r["task"] for r in stored["results"]] == ["memorization", "compression"]
    assert stored["results"][1]["seq_len"] == 2 * 32 - 2  # causal compression of the published 32
    assert cli.main(["eval", "formal", *common, "--languages", "parity"]) == 0
    assert "parity" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path)]) == 0  # both studies in one page, with their plots
    page = (tmp_path / "report.html").read_text()
    assert "<h2>mad</h2>" in page and "<h2>formal</h2>" in page and "memorization" in page and "parity" in page
    assert cli.main(["eval", "formal", *common, "--languages", "dyck"]) != 0
    assert "unknown language(s) dyck" in capsys.readouterr().err
    assert cli.main(["eval", "mad", *common[:2], "--width", "12", *common[4:]]) != 0
    assert "width must be a multiple of 8" in capsys.readouterr().err


def test_eval_help_lists_every_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    assert all(kind in listed for kind in ("zeroshot", "niah", "mqar", "mad", "formal", "continual"))
