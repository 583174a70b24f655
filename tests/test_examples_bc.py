"""The behaviour-cloning example runs end to end on a tiny budget."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script


def test_main_trains_both_optimizers_and_writes_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "bc.png"
    example = load_script("examples/behaviour_cloning.py")
    histories = example.main(["--epochs", "4", "--episodes", "16", "--horizon", "20", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert set(histories) == {"nested", "adam"}
    for history in histories.values():
        assert len(history.train) == len(history.val) == 4
        assert history.train[-1] < history.train[0] and history.val[-1] < history.val[0]
    metrics = histories["nested"].nested[-1]
    assert set(metrics) == {"nested/lr_multiplier_core", "nested/lr_multiplier_memory",
                            "nested/meta_loss", "nested/controller_grad_norm",
                            "nested/momentum_avg_norm"}
    assert metrics["nested/momentum_avg_norm"] > 0
