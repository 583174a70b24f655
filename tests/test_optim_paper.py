"""The Nested Learning optimizers against literal transcriptions of their equations (float64)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nestlearn.optim.dgd import DeltaGradientDescent, dgd_proximal_update, dgd_update
from nestlearn.optim.dmgd import DeepMomentumGD
from nestlearn.optim.m3 import M3
from nestlearn.optim.momentum import DeltaMomentum, PreconditionedMomentum
from nestlearn.optim.newton_schulz import newton_schulz

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
GradFn = Callable[[torch.Tensor], torch.Tensor]


def _quadratic_grad(seed: int, shape: tuple[int, int]) -> GradFn:
    """Gradient of a fixed convex quadratic in W: the gradients depend on the iterate."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=gen, dtype=F64)
    h = torch.randn(shape[1], shape[1], generator=gen, dtype=F64)
    hess = h @ h.T / shape[1] + 0.1 * torch.eye(shape[1], dtype=F64)
    return lambda w: (w - target) @ hess


def _run_on(opt_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
            w0: torch.Tensor, grad_fn: GradFn, steps: int) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    w = w0.clone().requires_grad_(True)
    opt = opt_factory([w])
    for _ in range(steps):
        w.grad = grad_fn(w.detach())
        opt.step()
    return w.detach(), opt




def _w0(shape: tuple[int, int] = (3, 5), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (6, 6)])
def test_newton_schulz_flattens_the_spectrum(shape: tuple[int, int]) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.6 and s.max() < 1.25


def test_newton_schulz_reshapes_conv_kernels_and_keeps_dtype() -> None:
    g = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    out = newton_schulz(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert torch.allclose(out.reshape(4, -1), newton_schulz(g.reshape(4, -1)))
    assert newton_schulz(g.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        newton_schulz(torch.ones(3))


# ----------------------------------------------------------------------------- momentum memories


@pytest.mark.parametrize("normalize", [True, False])
def test_delta_momentum_matches_eq_22(normalize: bool) -> None:
    lr, alpha, delta = 0.05, 0.9, 0.7
    quadratic = _quadratic_grad(3, (3, 5))
    scale = 1.0 if normalize else 0.3  # literal Eq. 22 is only stable while ||G||_2^2 < 1 + alpha

    def grad_fn(w: torch.Tensor) -> torch.Tensor:
        return scale * quadratic(w)

    w, m = _w0(), torch.zeros(3, 5, dtype=F64)
    for _ in range(25):  # m_{i+1} = m_i (alpha I - delta K^T K) - eta G ;  W_{i+1} = W_i + m_{i+1}
        g = grad_fn(w)
        k = g / g.norm() if normalize else g
        m = m @ (alpha * torch.eye(5, dtype=F64) - delta * k.T @ k) - lr * g
        w = w + m
    got, _ = _run_on(lambda p: DeltaMomentum(p, lr=lr, momentum=alpha, delta=delta,
                                             normalize=normalize), _w0(), grad_fn, 25)
    assert torch.allclose(got, w, atol=1e-12)


def test_delta_momentum_without_delta_is_eq_17_momentum() -> None:
    grad_fn = _quadratic_grad(4, (3, 5))
    w, m = _w0(), torch.zeros(3, 5, dtype=F64)
    for _ in range(20):
        m = 0.9 * m - 0.05 * grad_fn(w)
        w = w + m
    got, _ = _run_on(lambda p: DeltaMomentum(p, lr=0.05, momentum=0.9, delta=0.0), _w0(), grad_fn, 20)
    assert torch.allclose(got, w, atol=1e-12)


@pytest.mark.parametrize("preconditioner", ["diagonal", "left"])
def test_preconditioned_momentum_matches_eq_20(preconditioner: str) -> None:
    lr, alpha, beta2, eps = 0.02, 0.9, 0.99, 1e-8
    grad_fn = _quadratic_grad(5, (3, 5))
    w, m = _w0(), torch.zeros(3, 5, dtype=F64)
    v, left = torch.zeros(3, 5, dtype=F64), torch.zeros(3, 3, dtype=F64)
    for t in range(1, 21):  # m_{i+1} = alpha m_i - eta P_i G_i ;  W_{i+1} = W_i + m_{i+1}
        g = grad_fn(w)
        if preconditioner == "diagonal":
            v = beta2 * v + (1 - beta2) * g * g
            pg = g / (torch.sqrt(v / (1 - beta2**t)) + eps)
        else:
            left = beta2 * left + (1 - beta2) * g @ g.T
            evals, evecs = torch.linalg.eigh(left / (1 - beta2**t))
            p_mat = evecs @ torch.diag((evals.clamp_min(0) + eps) ** -0.5) @ evecs.T
            pg = p_mat @ g
        m = alpha * m - lr * pg
        w = w + m
    got, _ = _run_on(lambda p: PreconditionedMomentum(p, lr=lr, momentum=alpha, beta2=beta2, eps=eps,
                                                      preconditioner=preconditioner),  # type: ignore[arg-type]
                     _w0(), grad_fn, 20)
    assert torch.allclose(got, w, atol=1e-10)


def test_left_preconditioner_without_memory_is_orthogonalisation() -> None:
    g = _w0((3, 5), seed=7)
    w = torch.zeros(3, 5, dtype=F64, requires_grad=True)
    w.grad = g.clone()
    PreconditionedMomentum([w], lr=1.0, momentum=0.0, beta2=0.0, eps=1e-30,
                           preconditioner="left").step()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.allclose(w.detach(), -(u @ vh), atol=1e-8)


# ----------------------------------------------------------------------------- DMGD


@pytest.mark.parametrize(("objective", "nonlinearity"),
                         [("dot", "newton_schulz"), ("l2", "none"), ("dot", "none")])
def test_dmgd_matches_eq_23_24_with_an_mlp_memory(objective: str, nonlinearity: str) -> None:
    lr, alpha, eta, hidden, seed = 0.01, 0.9, 0.3, 4, 11
    grad_fn = _quadratic_grad(6, (3, 5))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 1)  # documented init: position 1
    b = torch.zeros(3, 5, dtype=F64)
    w1 = torch.randn(hidden, 5, generator=gen, dtype=F64) / 5**0.5
    w2 = torch.zeros(5, hidden, dtype=F64)
    w = _w0()

    def memory(b: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return b + torch.tanh(key @ w1.T) @ w2.T

    for _ in range(15):
        u = grad_fn(w)
        key = u / (u.norm() / u.numel() ** 0.5)
        phi = [t.clone().requires_grad_(True) for t in (b, w1, w2)]
        out = memory(phi[0], phi[1], phi[2], key)
        inner = -(out * u).sum() if objective == "dot" else 0.5 * ((out - u) ** 2).sum()
        grads = torch.autograd.grad(inner, phi)  # m_{i+1} = alpha m_i - eta grad L2(m_i; u_i)
        b, w1, w2 = (alpha * t.detach() - eta * gr for t, gr in zip(phi, grads, strict=True))
        step = memory(b, w1, w2, key)  # W_{i+1} = W_i - lr sigma(m_{i+1}(u_i))
        w = w - lr * (newton_schulz(step) if nonlinearity == "newton_schulz" else step)
    got, _ = _run_on(lambda p: DeepMomentumGD(p, lr=lr, momentum=alpha, inner_lr=eta,
                                              hidden_dim=hidden, objective=objective,  # type: ignore[arg-type]
                                              nonlinearity=nonlinearity, seed=seed),  # type: ignore[arg-type]
                     _w0(), grad_fn, 15)
    assert torch.allclose(got, w, atol=1e-10)


def test_dmgd_linear_memory_with_newton_schulz_is_muon() -> None:
    """The paper's claim under Eq. 24: linear memory + NS output = Muon (B <- mu B + G; W -= lr NS(B))."""
    lr, mu = 0.02, 0.95
    grad_fn = _quadratic_grad(8, (4, 6))
    w, buf = _w0((4, 6)), torch.zeros(4, 6, dtype=F64)
    for _ in range(30):
        buf = mu * buf + grad_fn(w)
        w = w - lr * newton_schulz(buf)
    got, _ = _run_on(lambda p: DeepMomentumGD(p, lr=lr, momentum=mu, hidden_dim=0), _w0((4, 6)),
                     grad_fn, 30)
    assert torch.allclose(got, w, atol=1e-12)


# ----------------------------------------------------------------------------- M3


def _m3_algorithm_1(theta0: torch.Tensor, grad_fn: GradFn, steps: int, lr: float,
                    betas: tuple[float, float, float], alpha: float, eps: float, f: int,
                    ns_steps: int) -> torch.Tensor:
    b1, b2, b3 = betas
    theta = theta0.clone()
    m1, m2, v = (torch.zeros_like(theta) for _ in range(3))  # line 1
    grads: dict[int, torch.Tensor] = {}
    k = 0
    while k * f < steps:  # line 2
        chunk = [grads[i] for i in range((k - 1) * f + 1, k * f + 1) if i in grads]
        m2 = m2 + b3 * sum(chunk, torch.zeros_like(theta))  # line 3 (the chunk's own f gradients)
        o2 = newton_schulz(m2, steps=ns_steps)  # line 4
        for t in range(k * f + 1, min((k + 1) * f, steps) + 1):  # line 5
            grads[t] = g = grad_fn(theta)  # line 6
            m1 = m1 + b1 * g  # line 7
            v = v + b2 * g**2  # line 8
            o1 = newton_schulz(m1, steps=ns_steps)  # line 9
            theta = theta - lr * (o1 + alpha * o2) / torch.sqrt(v + eps)  # line 10
        k += 1
    return theta


def test_m3_matches_algorithm_1_line_by_line() -> None:
    kw = {"lr": 0.01, "betas": (0.9, 0.99, 0.8), "alpha": 0.5, "eps": 1e-8}
    grad_fn = _quadratic_grad(9, (4, 6))
    ref = _m3_algorithm_1(_w0((4, 6)), grad_fn, 14, f=4, ns_steps=5, **kw)  # type: ignore[arg-type]
    got, _ = _run_on(lambda p: M3(p, frequency=4, **kw), _w0((4, 6)), grad_fn, 14)  # type: ignore[arg-type]
    assert torch.allclose(got, ref, atol=1e-12)


def test_m3_slow_momentum_changes_only_every_f_steps() -> None:
    grad_fn = _quadratic_grad(10, (3, 5))
    w = _w0().requires_grad_(True)
    opt = M3([w], lr=0.01, frequency=3)
    changed = []
    for t in range(1, 11):
        w.grad = grad_fn(w.detach())
        before = opt.state[w]["slow"].clone() if opt.state[w] else torch.zeros(3, 5, dtype=F64)
        opt.step()
        changed.append(t if not torch.equal(before, opt.state[w]["slow"]) else None)
    assert [t for t in changed if t] == [3, 6, 9]


# ----------------------------------------------------------------------------- DGD


def test_dgd_functional_is_the_explicit_eq_28_update() -> None:
    gen = torch.Generator().manual_seed(12)
    w, x, gy = (torch.randn(s, generator=gen, dtype=F64) for s in [(3, 5), (5,), (3,)])
    expected = w @ (torch.eye(5, dtype=F64) - 0.1 * torch.outer(x, x)) - 0.1 * torch.outer(gy, x)
    assert torch.allclose(dgd_update(w, x, gy, 0.1), expected, atol=1e-14)


def test_dgd_sherman_morrison_for_normalised_inputs() -> None:
    gen = torch.Generator().manual_seed(13)
    w, x, gy = (torch.randn(s, generator=gen, dtype=F64) for s in [(3, 5), (5,), (3,)])
    x = x / x.norm()
    eta = 0.7
    # argmin_W 1/2 ||W x + gy||^2 + 1/(2 eta) ||W - w||^2  <=>  W (x x^T + I/eta) = w/eta - gy x^T
    argmin = torch.linalg.solve((torch.outer(x, x) + torch.eye(5, dtype=F64) / eta).T,
                                (w / eta - torch.outer(gy, x)).T).T
    eta_p = eta / (1 + eta)  # arXiv Eq. 57
    closed = w @ (torch.eye(5, dtype=F64) - eta_p * torch.outer(x, x)) - eta_p * torch.outer(gy, x)
    assert torch.allclose(dgd_proximal_update(w, x, gy, eta), closed, atol=1e-13)
    assert torch.allclose(closed, argmin, atol=1e-12)
    assert torch.allclose(dgd_update(w, x, gy, eta_p), closed, atol=1e-13)


def test_dgd_batched_proximal_solves_the_regression() -> None:
    gen = torch.Generator().manual_seed(14)
    w, xs, gs = (torch.randn(s, generator=gen, dtype=F64) for s in [(3, 5), (7, 5), (7, 3)])
    new = dgd_proximal_update(w, xs, gs, 0.3)
    stationarity = (new @ xs.T + gs.T) @ xs + (new - w) / 0.3
    assert stationarity.abs().max() < 1e-11


def test_dgd_optimizer_per_sample_matches_eq_28_via_hooks() -> None:
    torch.manual_seed(15)
    layer = nn.Linear(5, 3, bias=False, dtype=F64)
    w = layer.weight.detach().clone()
    opt = DeltaGradientDescent(layer.parameters(), lr=0.05).watch(layer)
    gen = torch.Generator().manual_seed(16)
    for _ in range(10):
        x, target = torch.randn(5, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)
        opt.zero_grad()
        (0.5 * ((layer(x) - target) ** 2).sum()).backward()
        opt.step()
        grad_y = w @ x - target
        w = w @ (torch.eye(5, dtype=F64) - 0.05 * torch.outer(x, x)) - 0.05 * torch.outer(grad_y, x)
    assert torch.allclose(layer.weight.detach(), w, atol=1e-12)


@pytest.mark.parametrize("proximal", [False, True])
def test_dgd_optimizer_minibatch_form(proximal: bool) -> None:
    torch.manual_seed(17)
    layer = nn.Linear(5, 3, bias=False, dtype=F64)
    w0 = layer.weight.detach().clone()
    opt = DeltaGradientDescent(layer.parameters(), lr=0.2, proximal=proximal).watch(layer)
    gen = torch.Generator().manual_seed(18)
    xs, ts = torch.randn(2, 4, 5, generator=gen, dtype=F64), torch.randn(2, 4, 3, generator=gen, dtype=F64)
    (0.5 * ((layer(xs) - ts) ** 2).sum(-1).mean()).backward()  # the mean loss over the N = 8 rows
    opt.step()
    rows, n = xs.reshape(-1, 5), 8
    grad_y = (rows @ w0.T - ts.reshape(-1, 3)) / n
    if proximal:  # per-row targets u_t = -N grad_y
        expected = dgd_proximal_update(w0, rows / n**0.5, grad_y * n**0.5, 0.2)
    else:
        expected = w0 - 0.2 * (w0 @ rows.T @ rows / n + grad_y.T @ rows)
    assert torch.allclose(layer.weight.detach(), expected, atol=1e-12)
    opt.remove_hooks()
    layer(xs)
    assert not opt._inputs


@pytest.mark.parametrize(("decay", "proximal"), [(1.0, False), (0.5, True), (0.0, False)])
def test_dgd_optimizer_settles_at_the_biased_fixed_point(decay: float, proximal: bool) -> None:
    """GD on L + decay/2 mean||W x||^2: a linear regression converges to W* / (1 + decay)."""
    gen = torch.Generator().manual_seed(20)
    xs, target = torch.randn(16, 4, generator=gen, dtype=F64), torch.randn(2, 4, generator=gen, dtype=F64)
    layer = nn.Linear(4, 2, bias=False, dtype=F64)
    opt = DeltaGradientDescent(layer.parameters(), lr=0.3, decay=decay, proximal=proximal).watch(layer)
    for _ in range(400):
        opt.zero_grad()
        (0.5 * ((layer(xs) - xs @ target.T) ** 2).sum(-1).mean()).backward()
        opt.step()
    assert torch.allclose(layer.weight.detach(), target / (1 + decay), atol=1e-8)


# ----------------------------------------------------------------------------- every optimizer


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12, dtype=F64), nn.Tanh(), nn.Linear(12, 3, dtype=F64))


def _groups(model: nn.Module, vector_lr: float) -> list[dict[str, object]]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "lr": vector_lr}]


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "delta_momentum": lambda m: DeltaMomentum(m.parameters(), lr=0.03, momentum=0.9),
    "delta_momentum_literal": lambda m: DeltaMomentum(m.parameters(), lr=0.03, normalize=False),
    "precond_diagonal": lambda m: PreconditionedMomentum(m.parameters(), lr=0.003),
    "precond_left": lambda m: PreconditionedMomentum(m.parameters(), lr=0.003, eps=1e-6,
                                                     preconditioner="left"),
    "dmgd_muon": lambda m: DeepMomentumGD(_groups(m, 0.01), lr=0.02),
    "dmgd_mlp": lambda m: DeepMomentumGD(_groups(m, 0.01), lr=0.02, hidden_dim=8, inner_lr=0.1),
    "dmgd_l2_plain": lambda m: DeepMomentumGD(m.parameters(), lr=0.05, hidden_dim=4,
                                              objective="l2", inner_lr=0.1, nonlinearity="none"),
    "m3": lambda m: M3(_groups(m, 0.01), lr=0.002, frequency=5),
    "dgd": lambda m: DeltaGradientDescent(m.parameters(), lr=0.2).watch(m),
    "dgd_proximal": lambda m: DeltaGradientDescent(m.parameters(), lr=0.5, proximal=True).watch(m),
}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 6, generator=gen, dtype=F64)
    teacher = torch.linspace(-1, 1, 18, dtype=F64).reshape(6, 3)
    return x, torch.sin(x @ teacher)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> float:
    loss = torch.zeros(())
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    model = _net()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, range(7))
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _train(model, opt, range(7, 13))
    resumed = _net(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = OPTIMIZERS[name](resumed)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, range(7, 13))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decreases_the_loss_on_a_small_regression(name: str) -> None:
    model = _net()
    opt = OPTIMIZERS[name](model)
    x, y = _batch(0)
    with torch.no_grad():
        initial = float(((model(x) - y) ** 2).mean())
    final = _train(model, opt, range(200))
    assert final < 0.5 * initial, (initial, final)


ILL_CONDITIONED: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "delta_momentum": lambda p: DeltaMomentum(p, lr=0.1),
    "precond_diagonal": lambda p: PreconditionedMomentum(p, lr=0.01),
    "precond_left": lambda p: PreconditionedMomentum(p, lr=0.01, preconditioner="left"),
    "dmgd": lambda p: DeepMomentumGD(p, lr=0.01, hidden_dim=8, inner_lr=0.1),
    "m3": lambda p: M3(p, lr=0.01, frequency=10),
    "dgd": lambda p: DeltaGradientDescent(p, lr=0.9),
    "dgd_proximal": lambda p: DeltaGradientDescent(p, lr=10.0, proximal=True),
}


@pytest.mark.parametrize("name", ILL_CONDITIONED)
def test_no_nan_on_an_ill_conditioned_quadratic(name: str) -> None:
    """1/2 mean ||W x - W* x||^2 with input covariance of condition number 1e4, 1,000 steps."""
    d = 8
    curvature = torch.logspace(0, -4, d, dtype=F64)
    xs = torch.diag((d * curvature).sqrt())  # mean x x^T = diag(curvature)
    target = torch.randn(4, d, generator=torch.Generator().manual_seed(19), dtype=F64)
    layer = nn.Linear(d, 4, bias=False, dtype=F64)
    nn.init.zeros_(layer.weight)
    opt = ILL_CONDITIONED[name]([layer.weight])
    if isinstance(opt, DeltaGradientDescent):
        opt.watch(layer)
    losses = []
    for _ in range(1000):
        opt.zero_grad()
        loss = 0.5 * ((layer(xs) - xs @ target.T) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert torch.isfinite(layer.weight).all()
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
