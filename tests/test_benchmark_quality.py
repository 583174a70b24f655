"""benchmarks/quality.py's run planning (no training): the rows and seeds a command asks for are
the runs it trains, under names that keep budgets apart, and bad arguments exit in one line."""

from __future__ import annotations

import pytest

from conftest import load_script


def test_rows_and_seeds_select_the_runs_and_budgets_keep_their_own_names() -> None:
    quality = load_script("benchmarks/quality.py")
    args = quality.parse_args(["--lr", "hope=3e-3", "--rows", "all_on_s1,level_lr_flat"])
    runs = quality.ablation_runs(args)
    assert [r.name for r in runs] == ["ablation_all_on_s1", "ablation_level_lr_flat"]
    assert runs[1].overrides == ("optimizer.level_lr=flat",) and runs[1].lr == 3e-3
    assert [quality.ablation_row(r) for r in runs] == ["all_on_s1", "level_lr_flat"]
    longer = quality.parse_args(["--lr", "hope=3e-3", "--rows", "no_cms", "--ablation-tokens", "3010560"])
    assert [r.name for r in quality.ablation_runs(longer)] == ["ablation_no_cms_3010560"]
    assert quality.ablation_row(quality.ablation_runs(longer)[0]) == "no_cms"
    final = quality.final_runs(["hope"], quality.parse_args(["--lr", "hope=3e-3", "--seeds", "1,2"]))
    assert [(r.name, r.seed) for r in final] == [("final_hope_s1", 1), ("final_hope_s2", 2)]


@pytest.mark.parametrize("argv, message", [
    (["--rows", "no_such_row"], "unknown rows ['no_such_row']"),
    (["--seeds", "one"], "expected comma-separated integers"),
    (["--lr", "hope=fast"], "expected MODEL=RATE with a number"),
])
def test_bad_arguments_name_the_value(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    quality = load_script("benchmarks/quality.py")
    with pytest.raises(SystemExit) as exit_:
        quality.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
