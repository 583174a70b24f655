"""An installed wheel works outside the repository: it carries the configs, and `nestlearn run`
runs from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, load_script, tiny_overrides
from nestlearn.config import available_configs


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built into a wheel (no network: the build backend already installed) and
    installed, without dependencies, into a directory of its own."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist")], check=True, capture_output=True, timeout=300)
    wheels = list((root / "dist").glob("nestlearn-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(root / "site"), str(wheels[0])], check=True, capture_output=True, timeout=300)
    return root / "site"


def in_empty_dir(installed: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m nestlearn ARGS` from an empty directory, importing the installed copy."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False, timeout=600)


@pytest.mark.slow
def test_the_wheel_ships_every_config(installed: Path, tmp_path: Path) -> None:
    where = in_empty_dir(installed, tmp_path, "-c", "import nestlearn; print(nestlearn.__file__)")
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    listed = in_empty_dir(installed, tmp_path, "-m", "nestlearn", "configs")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == available_configs() and "hope/pilot_smoke" in listed.stdout


@pytest.mark.slow
def test_nestlearn_run_works_from_an_empty_directory(installed: Path, tmp_path: Path, tiny_root: Path,
                                                     tiny_prepared: Any) -> None:
    overrides = [*tiny_overrides(tiny_root), f"out_dir={tmp_path / 'runs'}", "train.steps=4",
                 "train.eval_every=4", "train.ckpt_every=4"]
    proc = in_empty_dir(installed, tmp_path, "-m", "nestlearn", "run", "-c", "transformer/pilot_smoke",
                        *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "tiny" / "report.html").is_file()
    assert (tmp_path / "runs" / "tiny" / "samples.json").is_file()


def test_the_makefile_constraints_keep_an_installed_torch() -> None:
    script = load_script("requirements/constraints.py")
    pinned = "# comment\ntorch==2.13.0\nnumpy==2.4.6\n"
    assert script.constraints(pinned, {"torch": "2.9.1+cu128"}) == "# comment\nnumpy==2.4.6\n"
    assert script.constraints(pinned, {"torch": None}) == pinned
    # in this environment torch is installed: the generated file has no torch pin
    out = subprocess.run([sys.executable, str(REPO / "requirements" / "constraints.py"),
                          str(REPO / "requirements" / "pinned.txt")],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "numpy==" in out and not any(line.startswith("torch==") for line in out.splitlines())
    assert "requirements/constraints.py requirements/pinned.txt > $(VENV)/constraints.txt" in (
        REPO / "Makefile").read_text()
