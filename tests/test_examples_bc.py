"""The behaviour-cloning example runs end to end on a tiny budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "behaviour_cloning.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("behaviour_cloning", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's names through it
    spec.loader.exec_module(module)
    return module


def test_main_trains_both_optimizers_and_writes_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "bc.png"
    histories = load_example().main(["--epochs", "4", "--episodes", "16", "--horizon", "20",
                                     "--out", str(out)])
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
