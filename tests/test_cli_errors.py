"""CLI error paths a new user hits: each is one line on stderr and exit code 2, found before any
work is done; overrides may follow options."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
