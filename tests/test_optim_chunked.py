"""ChunkedAdamW: level clocks inside one optimizer (optimizer.type: chunked)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from nestlearn.config import OptimizerConfig
from nestlearn.optim import ChunkedAdamW, build_optimizer, chunked_groups


class TwoLevels(nn.Module):
    """A fast linear layer feeding a slow one, with the levels declared as CMS models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = nn.Linear(3, 4)
        self.slow = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slow(torch.tanh(self.fast(x)))

    def levels(self) -> dict[str, list[nn.Parameter]]:
        return {"fast": list(self.fast.parameters()), "slow": list(self.slow.parameters())}

    def level_chunk_sizes(self) -> dict[str, int]:
        return {"fast": 1, "slow": 3}


def run(model: TwoLevels, opt: ChunkedAdamW, batches: list[torch.Tensor]) -> list[int]:
    """Train on `batches`; return the steps at which the slow level changed."""
    changed = []
    for step, x in enumerate(batches):
        before = model.slow.weight.detach().clone()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if not torch.equal(before, model.slow.weight):
            changed.append(step)
    return changed


def test_slow_level_fires_every_chunk_with_the_summed_gradient() -> None:
    torch.manual_seed(0)
    model = TwoLevels().double()
    opt = build_optimizer(OptimizerConfig(type="chunked", lr=0.1, weight_decay=0.0), model)
    assert isinstance(opt, ChunkedAdamW)
    assert [g["lr"] for g in opt.param_groups if g["level"] == "slow"] == [0.1 / 3] * 2  # the default, mean
    batches = [torch.randn(5, 3, dtype=torch.float64) for _ in range(7)]
    # The slow level's gradient at its first firing is the sum over its chunk of 3 steps,
    # each taken at the (unchanged) slow weights but the moving fast weights.
    probe = TwoLevels().double()
    probe.load_state_dict(model.state_dict())
    assert run(model, opt, batches[:3]) == [2]
    expected = torch.zeros_like(probe.slow.weight)
    fast_opt = torch.optim.AdamW(probe.fast.parameters(), lr=0.1, betas=(0.9, 0.95),
                                 weight_decay=0.0)
    for x in batches[:3]:
        probe.zero_grad()
        probe(x).pow(2).mean().backward()
        expected += probe.slow.weight.grad
        fast_opt.step()
    # After Adam's first step the update direction is sign-like: compare with the moment.
    state = opt.state[model.slow.weight]
    assert torch.allclose(state["exp_avg"], 0.1 * expected)  # (1 - beta1) * summed grad
    assert torch.allclose(model.fast.weight, probe.fast.weight)
    assert run(model, opt, batches[3:]) == [2]  # the next firing: 3 steps later (step 5)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(1)
    batches = [torch.randn(5, 3) for _ in range(8)]
    model = TwoLevels()
    groups = chunked_groups(model, model.level_chunk_sizes(), 0.05, 0.0)
    opt = ChunkedAdamW(groups)
    run(model, opt, batches[:4])
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    run(model, opt, batches[4:])
    final = [p.detach().clone() for p in model.parameters()]

    other = TwoLevels()
    other.load_state_dict(saved_model)
    for p, g in zip(other.parameters(), saved_grads, strict=True):
        p.grad = g
    opt2 = ChunkedAdamW(chunked_groups(other, other.level_chunk_sizes(), 0.05, 0.0))
    opt2.load_state_dict(saved_opt)
    run(other, opt2, batches[4:])
    assert all(torch.equal(a, b) for a, b in zip(final, other.parameters(), strict=True))


def test_a_model_without_levels_is_refused_clearly() -> None:
    try:
        build_optimizer(OptimizerConfig(type="chunked"), nn.Linear(2, 2))
    except ValueError as exc:
        assert "declares CMS levels" in str(exc) and "Linear" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


class Levels(nn.Module):
    """Two identical parameter vectors on clocks of 1 and C steps, fed the same gradients."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.fast, self.slow, self.chunk = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(64)), chunk

    def levels(self) -> dict[str, list[nn.Parameter]]:
        return {"fast": [self.fast], "slow": [self.slow]}

    def level_chunk_sizes(self) -> dict[str, int]:
        return {"fast": 1, "slow": self.chunk}


def movement(rule: str, chunk: int, signal: float, noise: float, steps: int = 1024) -> float:
    """Drift of the slow level along the mean gradient over that of the fast level, both fed
    the same gradients mean + noise under ChunkedAdamW with `rule`."""
    model = Levels(chunk)
    opt = build_optimizer(OptimizerConfig(type="chunked", lr=1e-3, weight_decay=0.0,
                                          level_lr=rule), model)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        g = signal + noise * torch.randn(64, generator=gen)
        for p in (model.fast, model.slow):
            p.grad = g.clone() if p.grad is None else p.grad + g
        opt.step()
        opt.zero_grad()
    return float(model.slow.detach().mean() / model.fast.detach().mean())


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_each_rule_moves_the_slow_level_as_derived(chunk: int) -> None:
    """Identical gradients: `sqrt` moves the slow level 1/√C as far as the fast one, `linear` as
    far, and the seed's `mean` (the default, measured best for HOPE) 1/C² as far."""
    assert movement("sqrt", chunk, 1.0, 0.0) == pytest.approx(1 / math.sqrt(chunk), rel=0.05)
    assert movement("linear", chunk, 1.0, 0.0) == pytest.approx(1.0, rel=0.05)
    assert movement("mean", chunk, 1.0, 0.0) == pytest.approx(1 / chunk**2, rel=0.05)


def test_on_noisy_gradients_sqrt_matches_the_drift() -> None:
    """Noise 10x the signal (Adam's square-root regime): sqrt drifts as far as the fast level."""
    assert movement("sqrt", 16, 0.1, 1.0, steps=4096) == pytest.approx(1.0, rel=0.3)
