"""DeepNestedOptimizer family: the port guide's checks, made into real assertions."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from nestlearn.optim.controller import NestedController
from nestlearn.optim.deep_nested import (
    ContinuumMemoryState,
    DeepNestedOptimizer,
    L2RegressionMomentum,
    _Carry,
)
from nestlearn.optim.meta_trainer import (
    SimplifiedMetaTrainer,
    UnrolledMetaTrainer,
    create_meta_trainer,
)
from nestlearn.optim.param_groups import group_titans_params, infer_param_depth

pytestmark = pytest.mark.usefixtures("one_thread")




class TinyTitan(nn.Module):
    """Core weights in numbered blocks plus memory-named parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.neural_memory = nn.Linear(8, 8)
        self.persistent = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        h = h + torch.tanh(self.neural_memory(h)) + self.persistent
        out: torch.Tensor = self.head(h)
        return out


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def data(seed: int = 0, n: int = 32, dtype: torch.dtype = torch.float32
         ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    return x, torch.sin(x[:, :1]) + 0.5 * x[:, 1:2]


def train(model: nn.Module, opt: DeepNestedOptimizer, steps: int, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    results = []
    for i in range(steps):
        x, y = data(seed + i, dtype=dtype)
        opt.zero_grad()
        loss = mse(model(x), y)
        torch.autograd.backward(loss)
        results.append(opt.step(loss.item()))
    return results


def test_param_grouping_and_depth() -> None:
    model = TinyTitan()
    core, memory = group_titans_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in memory) == ["neural_memory.bias", "neural_memory.weight",
                                                     "persistent"]
    assert len(core) + len(memory) == len(list(model.parameters()))
    assert infer_param_depth("blocks.3.attn.weight") == 3
    assert infer_param_depth("model.layers.12.mlp.bias") == 12
    assert infer_param_depth("embedding.weight") == -1
    emb = nn.Module()
    emb.embedding = nn.Embedding(3, 2)  # "embedding" must not match the "mem" marker
    assert group_titans_params(emb)[1] == []


def test_construction_with_every_option() -> None:
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, base_lr=2e-3, meta_lr=3e-4, k_unroll=3,
                              cms_frequencies=[1, 4, 16], momentum_hidden_dim=16,
                              controller_hidden_dim=8, use_gradient_checkpointing=False,
                              mode="explicit", meta_update_freq=7, weight_decay=0.01,
                              max_grad_norm=0.5)
    assert [g["name"] for g in opt.param_groups] == ["core", "memory"]
    assert len(opt.param_groups[1]["params"]) == 3
    assert all(g["lr"] == 2e-3 and g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert opt.momentum_mlp.hidden.out_features == 16
    assert isinstance(opt.meta_trainer, UnrolledMetaTrainer)
    assert not opt.meta_trainer.use_checkpointing and opt.meta_trainer.k_steps == 3
    assert opt.get_lr_multipliers() == [1.0, 1.0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"base_lr": 0.0}, "base_lr=0.0"),
    ({"meta_lr": -1.0}, "meta_lr=-1.0"),
    ({"k_unroll": 0}, "k_unroll=0"),
    ({"cms_frequencies": []}, "cms_frequencies"),
    ({"cms_frequencies": [10, 1]}, "strictly increasing"),
    ({"momentum_hidden_dim": 0}, "momentum_hidden_dim=0"),
    ({"controller_hidden_dim": 2.5}, "controller_hidden_dim=2.5"),
    ({"use_gradient_checkpointing": "yes"}, "use_gradient_checkpointing"),
    ({"mode": "auto"}, "mode='auto'.*'simple' or 'explicit'"),
    ({"meta_update_freq": True}, "meta_update_freq=True"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm=nan"),
])
def test_bad_options_give_clear_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeepNestedOptimizer(TinyTitan(), **kwargs)


def test_other_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        DeepNestedOptimizer(nn.ReLU())
    with pytest.raises(ValueError, match="mode='x'"):
        create_meta_trainer("x")
    with pytest.raises(ValueError, match="min_mult"):
        NestedController(min_mult=1.5)
    with pytest.raises(RuntimeError, match="mode='explicit'"):
        DeepNestedOptimizer(TinyTitan()).meta_update(data())


def test_step_changes_parameters_and_reports() -> None:
    torch.manual_seed(0)
    model = TinyTitan()
    opt = DeepNestedOptimizer(model)
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, opt, 1)[0]
    assert result["global_step"] == 1 and result["lr_multipliers"] == [1.0, 1.0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert opt.get_effective_lrs() == pytest.approx([1e-3, 1e-3])
    assert opt.get_momentum_stats()["momentum_avg_norm"] > 0
    assert opt.last_meta_loss is None


def test_untrained_rule_is_adam() -> None:
    """Init makes the deep momentum the Adam direction: first step moves each coordinate by lr."""
    torch.manual_seed(0)
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, base_lr=1e-2, max_grad_norm=1e9)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    for b, p in zip(before, model.parameters(), strict=True):
        moved = (p.detach() - b).abs()
        assert torch.allclose(moved[p.grad != 0], torch.full_like(moved[p.grad != 0], 1e-2),
                              rtol=1e-3)


def test_real_step_equals_the_differentiable_rule() -> None:
    """The in-place step (`direction_into`, CMS advanced in place) is the pure `_rule` that the
    meta-objectives differentiate: same parameters after several steps, float64, with a trained
    (non-zero) hidden path, weight decay, clipping and CMS levels firing."""
    torch.manual_seed(0)
    model = TinyTitan().double()
    opt = DeepNestedOptimizer(model, base_lr=1e-2, cms_frequencies=[1, 2, 3], weight_decay=0.1,
                              max_grad_norm=0.5, meta_update_freq=1000)
    with torch.no_grad():
        opt.momentum_mlp.out.weight.normal_(0.0, 0.5)
        opt.momentum_mlp.hidden.weight.normal_(0.0, 1.0)
    x, y = data(dtype=torch.float64)
    for step in range(5):
        model.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        params = [p.detach().clone() for p in opt._params]
        grads = [p.grad.detach().clone() for p in opt._params if p.grad is not None]
        assert len(grads) == len(params)
        carry = _Carry([opt.state[p]["cms"] for p in opt._params],
                       None if opt.ema_loss is None else torch.tensor(opt.ema_loss, dtype=torch.float64),
                       opt.global_step)
        with torch.no_grad():
            expected, _, _ = opt._rule(list(range(len(params))), params, grads, carry,
                                       loss.detach(), clip=True)
        opt.step(loss.item())
        for name, p, e in zip(opt._names, opt._params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13, msg=f"{name} @ {step}")


def test_clipping_bounds_the_applied_gradient() -> None:
    torch.manual_seed(0)
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, max_grad_norm=0.05)
    x, y = data()
    loss = 1e3 * mse(model(x), y)
    torch.autograd.backward(loss)
    result = opt.step(loss.item())
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                    if p.grad is not None]))
    assert result["grad_norm"] > 1.0
    assert float(applied) <= 0.05 * (1 + 1e-4)


def test_cms_levels_fire_at_their_frequencies() -> None:
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, cms_frequencies=[1, 3, 7], mode="explicit")
    results = train(model, opt, 21)
    fired = {r["global_step"]: r["cms_fired"] for r in results}
    assert fired[1] == [0] and fired[3] == [0, 1] and fired[7] == [0, 2] and fired[21] == [0, 1, 2]
    state: ContinuumMemoryState = opt.state[next(model.parameters())]["cms"]
    assert state.fires == (21, 7, 3) and state.steps == 21
    assert all(torch.count_nonzero(a) == 0 for a in state.accumulators[1:])  # just flushed
    g = torch.ones(2)
    s = ContinuumMemoryState.zeros_like(g, [1, 2])
    s = s.advanced(g)
    assert torch.equal(s.accumulators[1], g) and torch.count_nonzero(s.momenta[1]) == 0
    s = s.advanced(3 * g)  # level 1 folds in the chunk mean (1 + 3) / 2
    assert torch.allclose(s.momenta[1], 0.1 * 2 * g)


def test_multipliers_move_after_meta_updates_in_simple_mode() -> None:
    torch.manual_seed(0)
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, base_lr=1e-2, meta_lr=1e-2, k_unroll=3, meta_update_freq=5)
    mlp0 = [p.detach().clone() for p in opt.momentum_mlp.parameters()]
    ctrl0 = [p.detach().clone() for p in opt.controller.parameters()]
    results = train(model, opt, 30)
    metas = [r for r in results if "meta_loss" in r]
    assert [r["global_step"] for r in metas] == [5, 10, 15, 20, 25, 30]
    assert all(abs(m - 1.0) > 1e-3 for m in opt.get_lr_multipliers())
    assert opt.last_meta_loss is not None and opt.controller_grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(mlp0, opt.momentum_mlp.parameters(),
                                                     strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ctrl0, opt.controller.parameters(),
                                                     strict=True))
    assert results[-1]["lr_multipliers"] != [1.0, 1.0]


def test_simplified_meta_loss_improves_on_a_fixed_window() -> None:
    torch.manual_seed(0)
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, base_lr=1e-2, meta_lr=1e-2, k_unroll=4, meta_update_freq=50)
    train(model, opt, 49)  # the window now holds transitions 45→46 … 48→49
    trainer = opt.meta_trainer
    assert isinstance(trainer, SimplifiedMetaTrainer) and len(trainer.window) == 3
    losses = []
    for _ in range(40):
        meta, parts = trainer.meta_loss(opt.momentum_mlp, opt.controller)
        losses.append(float(meta.detach()))
        opt._meta_step(meta)
    assert losses[-1] < losses[0] - 1e-3
    assert parts["meta_regression"] >= 0


def test_explicit_mode_meta_update_improves_and_keeps_the_model() -> None:
    torch.manual_seed(0)
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, base_lr=1e-2, meta_lr=3e-3, k_unroll=3, mode="explicit")
    train(model, opt, 5)
    snapshot = [p.detach().clone() for p in model.parameters()]
    val = data(99)
    first = opt.meta_update(val, mse)
    for _ in range(15):
        last = opt.meta_update(val, mse, train_batches=[val, val, val])
    assert last["meta_loss"] < first["meta_loss"]
    assert first["meta_improvement"] < 0
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters(), strict=True))
    assert abs(opt.get_lr_multipliers()[0] - 1.0) < 1e-12  # multipliers report the last step
    train(model, opt, 1)
    assert opt.get_lr_multipliers() != [1.0, 1.0]


def test_port_guide_quick_verification_model_returning_loss() -> None:
    class SimpleModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(10, 5)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.fc(x).pow(2).mean()}

    model = SimpleModel()
    opt = DeepNestedOptimizer(model, base_lr=1e-3, mode="explicit", k_unroll=2)
    x = torch.randn(4, 10)
    out = model(x)
    out["loss"].backward()
    assert opt.step(out["loss"].item())["global_step"] == 1
    assert opt.meta_update(x)["meta_loss"] > 0  # a batch of inputs; the model scores itself


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unrolled_meta_gradient_matches_finite_differences(checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = TinyTitan().double()
    opt = DeepNestedOptimizer(model, base_lr=5e-2, k_unroll=3, mode="explicit",
                              use_gradient_checkpointing=checkpointing, cms_frequencies=[1, 2],
                              weight_decay=0.1)
    train(model, opt, 3, dtype=torch.float64)  # non-trivial CMS state and loss EMA
    meta_params = [*opt.momentum_mlp.parameters(), *opt.controller.parameters()]
    with torch.no_grad():  # leave the symmetric init so every meta-parameter matters
        for p in meta_params:
            p.add_(0.1 * torch.randn_like(p))
    batches = [data(10 + i, dtype=torch.float64) for i in range(3)]
    val = data(20, dtype=torch.float64)
    meta, _ = opt.meta_objective(val, mse, batches)
    grads = torch.autograd.grad(meta, meta_params)
    direction = [torch.randn_like(p) for p in meta_params]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    eps = 1e-6

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(meta_params, direction, strict=True):
                p.add_(sign * eps * d)
        value = float(opt.meta_objective(val, mse, batches)[0].detach())
        with torch.no_grad():
            for p, d in zip(meta_params, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_state_dict_round_trip_resumes_identically() -> None:
    def fresh() -> tuple[nn.Module, DeepNestedOptimizer]:
        torch.manual_seed(0)
        model = TinyTitan()
        return model, DeepNestedOptimizer(model, base_lr=1e-2, meta_lr=1e-2, k_unroll=3,
                                          meta_update_freq=5)

    model, opt = fresh()
    train(model, opt, 9)  # mid-window: a pending record and two recorded transitions
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 12, seed=9)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = fresh()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, 12, seed=9)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.get_lr_multipliers() == opt2.get_lr_multipliers()
    assert opt.last_meta_loss == opt2.last_meta_loss and opt2.global_step == 21
    other = DeepNestedOptimizer(nn.Linear(6, 1))
    with pytest.raises(ValueError, match="parameter counts"):
        other.load_state_dict(saved["opt"])


def test_no_nan_over_1000_steps_on_an_ill_conditioned_quadratic() -> None:
    torch.manual_seed(0)
    scales = torch.logspace(-2, 2, 20)  # condition number 1e8 in the Hessian
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(20))
    opt = DeepNestedOptimizer(model, base_lr=1e-2, meta_lr=1e-3, meta_update_freq=20)
    first = float("nan")
    for step in range(1000):
        opt.zero_grad()
        loss = 0.5 * (scales**2 * model.w**2).sum()
        torch.autograd.backward(loss)
        opt.step(loss.item())
        if step == 0:
            first = float(loss.detach())
    assert torch.isfinite(model.w).all()
    assert all(torch.isfinite(p).all() for p in opt.momentum_mlp.parameters())
    assert float(loss.detach()) < 1e-3 * first
    assert 0.1 <= min(opt.get_lr_multipliers()) <= max(opt.get_lr_multipliers()) <= 2.0


def test_torch_optimizer_compatibility() -> None:
    model = TinyTitan()
    opt = DeepNestedOptimizer(model, base_lr=1e-2, mode="explicit")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    x, y = data()

    def closure() -> float:
        opt.zero_grad()
        loss = mse(model(x), y)
        torch.autograd.backward(loss)
        return float(loss.detach())

    assert opt.step(closure)["global_step"] == 1
    sched.step()
    assert opt.get_effective_lrs()[0] == pytest.approx(5e-3)
    opt.zero_grad()
    assert opt.step()["global_step"] == 2  # no gradients: nothing to apply, still counted


def test_components_are_bounded_and_start_neutral() -> None:
    ctrl = NestedController(hidden_dim=4)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.normal_(0, 10)
    mults = ctrl(torch.randn(5, 6) * 1e3)
    assert ((mults >= 0.1) & (mults <= 2.0)).all()
    assert torch.isfinite(ctrl(torch.full((2, 6), float("nan")))).all()
    mlp = L2RegressionMomentum(3, hidden_dim=8, skip_index=1)
    x = torch.randn(10, 3)
    assert torch.equal(mlp(x), x[:, 1])
    assert torch.allclose(mlp(-x), -mlp(x))  # odd map: no drift
