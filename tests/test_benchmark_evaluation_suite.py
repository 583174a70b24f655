"""benchmarks/evaluation_suite.py at a tiny budget: each task's command trains into its own
directory, the table has a row per model with its seconds, and a rerun trains nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--task-args", "mqar=--seq-lens 32 --widths 16 --steps 2 --vocab-size 64 --num-pairs 2",
        "--task-args", "mad=--tasks memorization --width 16 --steps 2 --batch 4 --test-examples 4",
        "--task-args", "formal=--languages parity --width 16 --steps 2 --batch 4 --test-examples 4"]


def test_the_suite_runs_every_task_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = load_script("benchmarks/evaluation_suite.py")
    out = tmp_path / "suite.json"
    argv = ["--models", "transformer,hope", "--out-dir", str(tmp_path / "runs"), "--json", str(out), *TINY]
    assert suite.main(argv) == 0
    tables = json.loads(out.read_text())["tables"]
    assert set(tables) == {"mqar", "mad", "formal"}
    for task, columns in (("mqar", {"T32 d16"}), ("mad", {"memorization"}),
                          ("formal", {"parity train", "parity longest"})):
        assert [r["model"] for r in tables[task]] == ["transformer", "hope"]
        for row in tables[task]:
            assert set(row["scores"]) == columns and row["seconds"] > 0 and row["non_finite"] == 0
            assert 0.0 <= row["mean"] <= 1.0
    capsys.readouterr()
    assert suite.main(argv) == 0
    assert "non-finite" not in capsys.readouterr().out
    assert json.loads(out.read_text())["tables"] == tables  # resumed: every result reused as stored


def test_bad_task_arguments_name_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    suite = load_script("benchmarks/evaluation_suite.py")
    with pytest.raises(SystemExit):
        suite.parse_args(["--task-args", "niah=--lengths 1024"])
    assert "--task-args 'niah=--lengths 1024'" in capsys.readouterr().err
