"""benchmarks/agents.py at a tiny budget: every optimizer plugs into DQN (with and without the
experience memory) and PPO, the market's after-switch figures are measured, the table and JSON
are written, and a rerun resumes instead of training again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_agents_study_runs_every_cell_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agents = load_script("benchmarks/agents.py")
    out = tmp_path / "agents.json"
    argv = ["--steps", "200", "--seeds", "1", "--eval-episodes", "1", "--envs", "market", "--json", str(out),
            "--plot", str(tmp_path / "agents.png")]
    assert agents.main(argv) == 0
    blob = json.loads(out.read_text())
    assert len(blob["runs"]) == 4 * 2 + 4  # DQN with and without the memory, PPO; four optimizers
    for row in blob["table"]:
        assert row["diverged"] == 0 and {"return", "reward_per_step", "reward_after_switch"} <= set(row)
    assert (tmp_path / "agents.png").stat().st_size > 0
    capsys.readouterr()
    assert agents.main(argv) == 0
    assert "[1/" not in capsys.readouterr().out  # nothing trained again
    with pytest.raises(SystemExit, match="holds runs made with"):
        agents.main([*argv[:1], "300", *argv[2:]])


def test_acrobot_is_one_of_the_environments(tmp_path: Path) -> None:
    agents = load_script("benchmarks/agents.py")
    out = tmp_path / "acrobot.json"
    assert agents.main(["--steps", "200", "--seeds", "1", "--eval-episodes", "1", "--envs", "acrobot", "--algos", "dqn",
                        "--optimizers", "adamw", "--json", str(out), "--plot", ""]) == 0
    rows = json.loads(out.read_text())["table"]
    assert [r["memory"] for r in rows] == [False, True]  # DQN with and without the experience memory
    assert all(r["env"] == "acrobot" and r["diverged"] == 0 and -500 <= r["return"] <= 0 for r in rows)
