"""The minimal meta-learning demo: clamped meta outputs, differentiable k-step unrolls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nestlearn.optim.meta_step import (
    LR_RANGE,
    MOMENTUM_RANGE,
    MetaOptimizer,
    make_context,
    nested_training_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]




def toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)), x, y


def test_meta_optimizer_outputs_within_clamps() -> None:
    meta = MetaOptimizer(hidden_dim=8)
    with torch.no_grad():
        lr, mom = meta(make_context(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0)))
    assert float(lr) == pytest.approx(1e-3, rel=0.3) and 0.3 < float(mom) < 0.7
    with torch.no_grad():
        for p in meta.parameters():
            p.normal_(0, 50)
    contexts = torch.randn(100, 3) * 1e4
    lr, mom = meta(contexts)
    assert lr.shape == mom.shape == (100,)
    assert ((lr >= LR_RANGE[0]) & (lr <= LR_RANGE[1])).all()
    assert ((mom >= MOMENTUM_RANGE[0]) & (mom <= MOMENTUM_RANGE[1])).all()


@pytest.mark.parametrize("k", [1, 3])
def test_nested_training_step_decreases_loss(k: int) -> None:
    model, x, y = toy()
    meta = MetaOptimizer()
    meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-2)
    meta_before = [p.detach().clone() for p in meta.parameters()]
    buffers: dict[str, torch.Tensor] = {}
    with torch.autograd.set_detect_anomaly(True):  # surfaces any in-place version error
        outs = [nested_training_step(model, meta, meta_opt, x, y, nn.functional.mse_loss,
                                     buffers, k=k) for _ in range(25)]
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    assert final < 0.7 * outs[0]["loss"]
    assert all(out["meta_loss"] == out["meta_loss"] for out in outs)  # no NaN
    assert all(LR_RANGE[0] <= o["lr"] <= LR_RANGE[1] for o in outs)
    assert set(buffers) == {n for n, _ in model.named_parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(meta_before, meta.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # the unroll never touched .grad


def test_nested_training_step_rejects_bad_k() -> None:
    model, x, y = toy()
    meta = MetaOptimizer()
    with pytest.raises(ValueError, match="k=0"):
        nested_training_step(model, meta, torch.optim.Adam(meta.parameters()), x, y,
                             nn.functional.mse_loss, {}, k=0)


def test_minimal_meta_example_runs(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "minimal_meta.py"),
                           "--steps", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.count("| lr ") == 5 and "momentum" in proc.stdout
    assert out.stat().st_size > 1000
