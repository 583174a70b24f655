"""MQAR from scratch (``eval.mqar_train``): a tiny attention model learns recall within the test,
every model type trains on it, a sweep resumes, and the CLI writes its results."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from nestlearn import cli, models
from nestlearn.eval.mqar import IGNORE, MQARConfig, mqar_batch
from nestlearn.eval.mqar_train import MODELS, MQARSweep, sweep_and_save, train_setting
from nestlearn.eval.synthetic import build_model, scored_logits

pytestmark = pytest.mark.usefixtures("one_thread")

EASY = MQARSweep(num_pairs=2, vocab_size=64, steps=300, batch=64, lr=1e-3, eval_examples=256)


def test_a_tiny_attention_model_learns_recall() -> None:
    """2 layers of width 64 on 2 pairs in 32 tokens: ~0.5 (a guess among the context's values)
    until the induction circuit forms, then above 0.9 within 300 steps."""
    result = train_setting("transformer", 64, 32, EASY)
    assert result["finite"] and result["accuracy"] > 0.9, result
    untrained = train_setting("transformer", 64, 32, dataclasses.replace(EASY, steps=1))
    assert untrained["accuracy"] < 0.6


@pytest.mark.parametrize("model_type", models.available())
def test_scored_logits_are_the_full_logits_at_the_answers(model_type: str) -> None:
    """The head applied to the answers' hidden states only: the same logits and gradients as
    the full forward's at those positions (float64), and the model's head is put back."""
    torch.manual_seed(0)
    model = build_model(model_type, 32, 2, 32, 64).double()
    x, y = mqar_batch(MQARConfig(seq_len=32, num_pairs=2, vocab_size=64), 3, torch.Generator().manual_seed(1))
    full = model(x)[0][y != IGNORE]
    grads = torch.autograd.grad(full.square().sum(), list(model.parameters()), allow_unused=True)
    logits, answers = scored_logits(model, x, y, IGNORE)
    assert torch.equal(answers, y[y != IGNORE]) and not isinstance(model.lm_head, torch.nn.Identity)
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)
    mine = torch.autograd.grad(logits.square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, mine, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_a_sweep_of_every_model_type_resumes(tmp_path: Path) -> None:
    quick = dataclasses.replace(EASY, models=MODELS, seq_lens=(32,), widths=(32,), steps=3, eval_examples=16)
    path, blob = sweep_and_save(quick, tmp_path)
    assert path == tmp_path / "eval" / "mqar.json" and {r["model"] for r in blob["results"]} == set(MODELS)
    assert all(r["finite"] and math.isfinite(r["final_loss"]) and 0 <= r["accuracy"] <= 1 for r in blob["results"])
    first = blob["results"]
    _, again = sweep_and_save(dataclasses.replace(quick, models=("transformer",), widths=(32, 16)), tmp_path)
    assert again["results"][:len(first)] == first  # kept, not retrained
    assert [(r["model"], r["width"]) for r in again["results"][len(first):]] == [("transformer", 16)]
    with pytest.raises(ValueError, match="other training settings"):
        sweep_and_save(dataclasses.replace(quick, steps=4), tmp_path)


def test_the_cli_trains_and_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "mqar", "--models", "transformer", "--seq-lens", "32", "--widths", "16", "--steps", "2",
            "--vocab-size", "64", "--num-pairs", "2", "--out-dir", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "transformer" in out and f"results: {tmp_path / 'eval' / 'mqar.json'}" in out
    assert json.loads((tmp_path / "eval" / "mqar.json").read_text())["results"][0]["num_pairs"] == 2
    assert cli.main([*args[:7], "12", *args[8:]]) != 0
    assert "must be a multiple of 8, >= 8, got 12" in capsys.readouterr().err
    assert cli.main([*args[:2], "--models", "nope", *args[4:]]) != 0
    assert "unknown model type" in capsys.readouterr().err
