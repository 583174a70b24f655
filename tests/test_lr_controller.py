"""NestedLRController: the learning rate stays in its bounds and scales the base rate; the
controller is meta-trained by the one-step hypergradient (its parameters change, and it moves
the rate the way the loss wants); it plugs into stable-baselines3 as `optimizer_class`."""

from __future__ import annotations

import pytest
import torch

from nestlearn.optim import NestedLRController

pytestmark = pytest.mark.usefixtures("one_thread")

CURVATURE = torch.linspace(1.0, 10.0, 20, dtype=torch.float64)


def quadratic_run(lr: float, steps: int, controlled: bool, **kwargs: float) -> tuple[float, list[float], NestedLRController | None]:
    """SGD on 0.5 Σ c_i θ_i², from a fixed start; final loss, multipliers, the optimizer."""
    p = torch.nn.Parameter(torch.ones(20, dtype=torch.float64))
    opt: torch.optim.Optimizer = (NestedLRController([p], lr=lr, base=torch.optim.SGD, **kwargs) if controlled  # type: ignore[arg-type]
                                  else torch.optim.SGD([p], lr=lr))
    mults = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (CURVATURE * p * p).sum()
        loss.backward()
        if isinstance(opt, NestedLRController):
            opt.observe(loss)
        opt.step()
        if isinstance(opt, NestedLRController):
            mults.append(opt.last_multipliers[0])
    return float(0.5 * (CURVATURE * p * p).sum()), mults, opt if isinstance(opt, NestedLRController) else None


def test_the_rate_stays_in_its_bounds_and_scales_the_base_rate() -> None:
    p = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = NestedLRController([p], lr=0.05, base=torch.optim.SGD, min_mult=0.5, max_mult=1.5, meta_every=1, meta_lr=1.0)
    for step in range(120):
        if step == 60:
            opt.param_groups[0]["lr"] = 0.01  # a schedule (or stable-baselines3) sets the base rate
        opt.zero_grad()
        (0.5 * (CURVATURE * p * p).sum()).backward()
        grad, before = p.grad.clone(), p.detach().clone()  # type: ignore[union-attr]
        opt.step()
        (m,) = opt.last_multipliers
        assert 0.5 <= m <= 1.5
        rate = 0.05 if step < 60 else 0.01
        torch.testing.assert_close(p.detach(), before - rate * m * grad)
        assert opt.param_groups[0]["lr"] == rate and opt.effective_lrs() == [pytest.approx(rate * m)]


@pytest.mark.parametrize(("lr", "direction"), [(0.01, "up"), (0.22, "down")])
def test_the_controller_learns_which_way_the_loss_wants_the_rate(lr: float, direction: str) -> None:
    """Too small a rate (consecutive gradients agree) is raised; one at which plain SGD diverges
    (lr x the largest curvature 10 = 2.2 > 2: consecutive gradients disagree along the stiffest
    direction) is lowered below the stability limit 0.9. Either way the loss ends below SGD's."""
    plain, _, _ = quadratic_run(lr, 100, controlled=False)
    controlled, mults, opt = quadratic_run(lr, 100, controlled=True, meta_every=5, meta_lr=0.05)
    assert opt is not None
    start = NestedLRController([torch.nn.Parameter(torch.zeros(1))]).controller.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in opt.controller.state_dict().items())  # meta-trained
    assert mults[0] == pytest.approx(1.0)  # an untrained controller is the base optimizer
    assert (mults[-1] > 1.2) if direction == "up" else (mults[-1] < 0.9)
    assert controlled < plain


def test_td_error_features_and_closures_are_taken() -> None:
    net = torch.nn.Linear(4, 2)
    opt = NestedLRController(net.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)

    def closure() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return float(loss)

    for _ in range(12):
        opt.observe(td_errors=torch.randn(32))
        assert isinstance(opt.step(closure), float)
    assert all(0.1 <= m <= 2.0 for m in opt.last_multipliers) and opt.updates == 12


def test_stable_baselines3_dqn_trains_with_it() -> None:
    sb3 = pytest.importorskip("stable_baselines3")
    model = sb3.DQN("MlpPolicy", "CartPole-v1", learning_starts=64, train_freq=4, batch_size=32, seed=0,
                    policy_kwargs={"optimizer_class": NestedLRController,
                                   "optimizer_kwargs": {"meta_every": 5}, "net_arch": [32]})
    model.learn(total_timesteps=600)
    opt = model.policy.optimizer
    assert isinstance(opt, NestedLRController) and opt.updates > 50
    assert all(0.1 <= m <= 2.0 for m in opt.last_multipliers)
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
