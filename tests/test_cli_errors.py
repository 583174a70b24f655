"""CLI error paths a new user hits: each is one line on stderr and exit code 2, found before any
work is done; overrides may follow options."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_overrides
from nestlearn import cli
from nestlearn.config import available_configs


def one_line_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nestlearn: error: ") and "\n" not in err, err
    return err


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "name=x", "--config-name", "transformer/pilot_smoke", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert '"name": "x"' in out and '"steps": 5' in out
    with pytest.raises(SystemExit):  # an unknown option is still refused
        cli.main(["config", "name=x", "--nope"])


def test_configs_lists_only_what_config_name_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["configs"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == available_configs() and not any(n.startswith("level_clock/") for n in out.split())
    assert "level_clock/small is a level-clock preset" in err
    assert "level_clock/small is a level-clock preset" in one_line_error(capsys, ["config", "-c", "level_clock/small"])


def test_report_of_a_missing_run_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "is neither a run directory" in one_line_error(capsys, ["report", str(tmp_path / "nope")])


def test_a_bad_model_type_is_refused_before_data_preparation(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    err = one_line_error(capsys, ["prepare", f"data.artifacts_dir={tmp_path}", "model.type=transfomer"])
    assert "unknown model.type 'transfomer'" in err and "did you mean 'transformer'" in err
    assert not any(tmp_path.iterdir())  # nothing prepared


def test_piping_into_a_closed_reader_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nestlearn config | head -c 1``: stdout is a pipe whose reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert cli.main(["config"]) == 0
    finally:
        monkeypatch.undo()
        stdout.close()


def test_malformed_yaml_wrong_types_and_missing_files_are_one_line(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert "expected valid YAML at line 2" in one_line_error(
        capsys, ["config", "--config-path", str(tmp_path), "-c", "broken"])
    assert "got 'many', expected an integer" in one_line_error(capsys, ["config", "train.steps=many"])
    err = one_line_error(capsys, ["prepare", f"data.artifacts_dir={tmp_path / 'a'}", "data.sources=[/nope/missing.txt]"])
    assert "source '/nope/missing.txt': no such file" in err and not (tmp_path / "a").exists()


def test_a_tokenizer_or_checkpoint_of_another_model_config_is_refused_untouched(
        capsys: pytest.CaptureFixture[str], tiny_root: Path, tiny_prepared: Any, tmp_path: Path) -> None:
    common = [*tiny_overrides(tiny_root), f"out_dir={tmp_path}", "train.steps=2", "train.eval_every=2",
              "train.ckpt_every=2", "train.eval_batches=1", "train.batch_size=4"]
    tokenizer = tiny_prepared.tokenizer_path  # 512 pieces, for a model of 100 rows
    err = one_line_error(capsys, ["train", *common, "name=small_vocab", "model.vocab_size=100",
                                  f"data.tokenizer.path={tokenizer}"])
    assert "model.vocab_size=100 is smaller than the tokenizer's vocabulary (512)" in err
    assert not (tmp_path / "small_vocab").exists()
    assert cli.main(["train", *common, "name=other"]) == 0
    checkpoint = next((tmp_path / "other" / "checkpoints").iterdir())
    capsys.readouterr()
    err = one_line_error(capsys, ["train", *common, "name=wider", "model.d_model=32", "--resume", str(checkpoint)])
    assert f"cannot resume from {checkpoint}: its config differs in model.d_model" in err
    assert not (tmp_path / "wider" / "config.json").exists()
