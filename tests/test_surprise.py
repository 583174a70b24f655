"""Surprise objectives: the signal against a hand computation, where the aux gradients go,
and the training-loop paths with surprise on, off and every n steps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nestlearn.models.nested_mlp import NestedModel, NestedModelWithSurprise
from nestlearn.optim.level_clock import ChunkedUpdateScheduler, setup_optimizers
from nestlearn.optim.surprise import SurpriseLossComputer
from nestlearn.train.level_loop import LevelHistory, train_loop, train_loop_with_surprise

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHUNKS = {"level1_fast": 1, "level2_medium": 2, "level3_slow": 4}
TINY_PRESET = """input_size: 8
hidden_size: 16
chunk_sizes: {level1_fast: 1, level2_medium: 2, level3_slow: 4}
surprise_weights: {level1_fast: 0.3, level2_medium: 0.1}
"""
ALL = {"level1_fast": 1.0, "level2_medium": 1.0, "level3_slow": 1.0}


def tiny(seed: int = 0) -> NestedModelWithSurprise:
    torch.manual_seed(seed)
    return NestedModelWithSurprise(3, 5).double()


def batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return x, torch.cos(2 * x)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz [z Phi(z)] = Phi(z) + z phi(z)."""
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def test_surprise_signal_matches_a_hand_computation() -> None:
    model = tiny()
    with torch.no_grad():
        model.level3_slow.fc2.weight.zero_()  # y3 = y2 + b: level 3 passes the gradient on
    x, t = batch()
    out = model.forward_with_surprise(x)
    loss = nn.functional.mse_loss(out.output, t)  # mean over 4 rows x 3 features
    signals = SurpriseLossComputer(ALL, gradient_clip_value=None).compute_surprise_signals(
        loss, out.activations)

    y1, y3 = out.activations["level1_fast"], out.activations["level3_slow"]
    per_row = 2 * (y3 - t) / 3  # R * dL/dy3 with R = 4 rows, L = sum / 12
    torch.testing.assert_close(signals["level3_slow"], per_row.detach())
    torch.testing.assert_close(signals["level2_medium"], per_row.detach())
    # through level 2: dy2/dy1 = I + W2 diag(gelu'(W1 y1 + b1)) W1, row by row
    b2 = model.level2_medium
    z = (y1 @ b2.fc1.weight.T + b2.fc1.bias).detach()
    jac = torch.eye(3, dtype=torch.float64) + torch.einsum(
        "ij,bj,jk->bik", b2.fc2.weight.detach(), gelu_grad(z), b2.fc1.weight.detach())
    torch.testing.assert_close(signals["level1_fast"],
                               torch.einsum("bi,bik->bk", per_row.detach(), jac))

    clipped = SurpriseLossComputer(ALL, gradient_clip_value=0.05).compute_surprise_signals(
        loss, out.activations)
    torch.testing.assert_close(clipped["level3_slow"], per_row.detach().clamp(-0.05, 0.05))
    assert not any(s.requires_grad for s in signals.values())


def test_surprise_signal_does_not_depend_on_batch_size() -> None:
    model = tiny()
    computer = SurpriseLossComputer({"level1_fast": 1.0}, None)
    x, t = batch()
    rows = []
    for xs, ts in ((x, t), (x[:2], t[:2])):
        out = model.forward_with_surprise(xs)
        loss = nn.functional.mse_loss(out.output, ts)
        rows.append(computer.compute_surprise_signals(loss, out.activations)["level1_fast"])
    torch.testing.assert_close(rows[0][:2], rows[1])


@pytest.mark.parametrize("level", ["level1_fast", "level2_medium", "level3_slow"])
def test_aux_loss_is_finite_and_reaches_only_its_level(level: str) -> None:
    model = tiny()
    x, t = batch()
    out = model.forward_with_surprise(x)
    loss = nn.functional.mse_loss(out.output, t)
    aux, per_level = SurpriseLossComputer({level: 0.5}, 10.0).compute(
        loss, out.activations, out.predictions)
    assert set(per_level) == {level} and torch.isfinite(aux) and aux.item() > 0
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(aux, list(model.parameters()), allow_unused=True)
    reached = {n for n, g in zip(names, grads, strict=True) if g is not None and g.abs().sum() > 0}
    mine = {f"{level}.fc1.weight", f"{level}.fc1.bias", f"{level}.fc2.weight", f"{level}.fc2.bias",
            f"surprise_heads.{level}.weight", f"surprise_heads.{level}.bias"}
    assert reached == mine


def test_surprise_computer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        SurpriseLossComputer({"level1_fast": -0.1}, 10.0)
    with pytest.raises(ValueError, match="gradient_clip_value"):
        SurpriseLossComputer({"level1_fast": 0.1}, 0.0)
    model = tiny()
    out = model.forward_with_surprise(batch()[0])
    with pytest.raises(ValueError, match=r"no activations for surprise levels \['level4'\]"):
        SurpriseLossComputer({"level4": 0.1}, 1.0).compute(out.output.sum(), out.activations,
                                                          out.predictions)


def loop(steps: int, use_surprise: bool | None = None, every: int = 1) -> LevelHistory:
    """The plain loop (use_surprise=None) or the surprise loop, on the same tiny run."""
    model = tiny()
    opts = setup_optimizers(model, CHUNKS, 1e-2)
    sched = ChunkedUpdateScheduler(CHUNKS)
    if use_surprise is None:
        return train_loop(model, batch, nn.MSELoss(), opts, sched, steps, "cpu",
                          progress="none")
    surprise = SurpriseLossComputer({"level1_fast": 0.3, "level2_medium": 0.1}, 10.0)
    return train_loop_with_surprise(model, batch, nn.MSELoss(), opts, sched, surprise, steps,
                                    "cpu", progress="none", use_surprise=use_surprise,
                                    compute_surprise_every_n_steps=every)


def test_use_surprise_false_is_the_plain_loop() -> None:
    plain = loop(8)
    off = loop(8, use_surprise=False)
    on = loop(8, use_surprise=True)
    assert off.losses == plain.losses
    assert off.aux_losses == [0.0] * 8
    assert off.aux_per_level == {}
    assert on.losses[0] == plain.losses[0] and on.losses[1:] != plain.losses[1:]
    assert all(v > 0 for v in on.aux_losses)
    assert on.update_counts == off.update_counts == {"level1_fast": 8, "level2_medium": 4,
                                                     "level3_slow": 2}


def test_surprise_every_n_steps() -> None:
    history = loop(7, use_surprise=True, every=3)
    assert [v > 0 for v in history.aux_losses] == [s % 3 == 0 for s in range(7)]
    assert [math.isnan(v) for v in history.aux_per_level["level2_medium"]] == [
        s % 3 != 0 for s in range(7)]
    with pytest.raises(ValueError, match="every_n_steps"):
        loop(2, use_surprise=True, every=0)
    with pytest.raises(TypeError, match="NestedModelWithSurprise"):
        plain = NestedModel(3, 5).double()
        opts = setup_optimizers(plain, CHUNKS, 1e-2)
        train_loop_with_surprise(plain, batch, nn.MSELoss(), opts,  # type: ignore[arg-type]
                                 ChunkedUpdateScheduler(CHUNKS),
                                 SurpriseLossComputer({"level1_fast": 0.1}), 2, "cpu",
                                 progress="none")


def test_surprise_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for name in ("cms_quickstart", "surprise_example"):
        sys.modules.pop(name, None)
    import surprise_example

    out = tmp_path / "surprise.png"
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    runs = surprise_example.main(["--steps", "4", "--batch-size", "4", "--preset", str(preset),
                                  "--out", str(out)])
    assert out.stat().st_size > 0
    assert runs["baseline"].aux_losses == [0.0] * 4
    assert all(v > 0 for v in runs["with surprise"].aux_losses)
