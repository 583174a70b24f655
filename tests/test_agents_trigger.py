"""Trigger-gated fast weights: the step is the library's DGD step per sample; a shut trigger
leaves the fast weights as they started, an open one lets them learn the sequence; the trigger
trains through the output; a PPO policy on RegimeMarketEnv uses it."""

from __future__ import annotations

import pytest
import torch

from nestlearn.agents.trigger import (
    TriggeredFastWeights,
    TriggeredMemoryExtractor,
    gated_delta_step,
)
from nestlearn.optim.dgd import dgd_update

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_gated_step_is_the_dgd_step_of_each_sample() -> None:
    g = torch.Generator().manual_seed(0)
    w, k, v = (torch.randn(3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64),
               torch.randn(3, 4, generator=g, dtype=torch.float64))
    rate = torch.tensor([0.0, 0.1, 0.7], dtype=torch.float64)
    got = gated_delta_step(w, k, v, rate)
    for b in range(3):
        torch.testing.assert_close(got[b], dgd_update(w[b], k[b], -v[b], float(rate[b])), rtol=1e-12, atol=1e-12)


def set_trigger(memory: TriggeredFastWeights, bias: float) -> None:
    with torch.no_grad():
        memory.trigger[2].weight.zero_()
        memory.trigger[2].bias.fill_(bias)


def test_a_shut_trigger_keeps_the_fast_weights_and_an_open_one_learns() -> None:
    torch.manual_seed(0)
    memory = TriggeredFastWeights(1, d_model=8, lr=1.0)
    seq = torch.sin(torch.arange(32.0) / 3).reshape(1, 32, 1).expand(4, 32, 1)
    set_trigger(memory, -30.0)
    out = memory(seq)
    assert memory.firing_rate < 1e-9 and float(out[:, 8:].abs().max()) < 1e-10  # W stays W0 = 0
    set_trigger(memory, 30.0)
    out = memory(seq)
    assert memory.firing_rate == pytest.approx(1.0) and bool(out[:, 8:].abs().sum() > 0)


def test_the_trigger_and_rate_train_through_the_output() -> None:
    memory = TriggeredFastWeights(1, d_model=8)
    memory(torch.randn(2, 10, 1)).pow(2).sum().backward()
    for p in (memory.trigger[0].weight, memory.log_lr, memory.embed.weight):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_a_ppo_policy_on_the_market_uses_it() -> None:
    sb3 = pytest.importorskip("stable_baselines3")
    from nestlearn.agents import RegimeMarketEnv

    model = sb3.PPO("MlpPolicy", RegimeMarketEnv(episode_length=64), n_steps=64, batch_size=32, n_epochs=1, seed=0,
                    policy_kwargs={"features_extractor_class": TriggeredMemoryExtractor,
                                   "features_extractor_kwargs": {"d_model": 8}})
    model.learn(total_timesteps=128)
    extractor = model.policy.features_extractor
    assert isinstance(extractor, TriggeredMemoryExtractor) and 0.0 < extractor.memory.firing_rate < 1.0
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
