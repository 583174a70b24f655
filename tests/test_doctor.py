"""`nestlearn doctor` reports the installation and flags what a default run lacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nestlearn import __version__, cli, doctor


def test_doctor_reports_versions_threads_kernels_and_corpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["nestlearn", __version__]
    for expected in (__version__, torch.__version__, f"torch uses {torch.get_num_threads()}",
                     "extra eval: lm_eval", "default corpus (stdlib)", "C++ kernels"):
        assert expected in out, expected
    assert "PROBLEM" not in out


def test_doctor_flags_a_missing_corpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(doctor, "stdlib_root", lambda: tmp_path / "no-stdlib")
    assert cli.main(["doctor"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("default corpus"))
    assert "not found" in line and "data.sources" in line and line.endswith("<- PROBLEM")
