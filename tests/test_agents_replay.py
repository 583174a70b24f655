"""NestedReplayBuffer and NestedDQN: transitions go through the experience memory's levels,
batches mix the ring and the episodic store with the right shapes and contents, TD errors set
priorities and train the gate, and a DQN on CartPole trains with both and the LR controller."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

from nestlearn.agents.replay import NestedDQN, NestedReplayBuffer
from nestlearn.optim import NestedLRController

pytestmark = pytest.mark.usefixtures("one_thread")


def filled_buffer(n: int = 200, **kwargs: float) -> NestedReplayBuffer:
    env = gymnasium.make("CartPole-v1")
    buffer = NestedReplayBuffer(128, env.observation_space, env.action_space, device="cpu", **kwargs)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for i in range(n):
        obs = rng.normal(size=(1, 4)).astype(np.float32)
        buffer.add(obs, obs + 1, np.array([i % 2]), np.array([float(i)]), np.array([0.0]), [{}])
    return buffer


def test_batches_mix_the_ring_and_the_episodic_store_with_their_transitions() -> None:
    torch.manual_seed(0)
    buffer = filled_buffer(episodic_fraction=0.25, episodic_threshold=0.0)
    batch = buffer.sample(32)
    assert batch.observations.shape == (32, 4) and batch.actions.shape == (32, 1)
    assert batch.rewards.shape == (32, 1) and batch.dones.shape == (32, 1)
    torch.testing.assert_close(batch.next_observations, batch.observations + 1)  # decoded as stored
    assert torch.equal(batch.actions.reshape(-1) % 2, batch.actions.reshape(-1))
    episodic_rewards = batch.rewards[24:].reshape(-1)
    assert bool((episodic_rewards < 72).any())  # items the ring (last 128 of 200) has overwritten


def test_td_errors_set_priorities_and_train_the_gate() -> None:
    torch.manual_seed(0)
    buffer = filled_buffer(episodic_fraction=0.0)
    before = [p.detach().clone() for p in buffer.memory.gate.parameters()]
    buffer.sample(16)
    working = buffer._last_rows[0]  # type: ignore[index]
    td = torch.linspace(0.0, 2.0, 16)
    buffer.update_importance(td)
    assert max(buffer.priorities[working]) == pytest.approx(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, buffer.memory.gate.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="call sample first"):
        buffer.update_importance(td)


def test_bad_settings_are_one_line_errors() -> None:
    env = gymnasium.make("Pendulum-v1")
    with pytest.raises(ValueError, match="needs a Discrete action space"):
        NestedReplayBuffer(16, env.observation_space, env.action_space)  # type: ignore[arg-type]


def test_a_nested_dqn_trains_with_the_buffer_and_the_lr_controller() -> None:
    model = NestedDQN("MlpPolicy", "CartPole-v1", learning_starts=64, train_freq=4, batch_size=32, seed=0,
                      buffer_size=2000, replay_buffer_class=NestedReplayBuffer,
                      policy_kwargs={"optimizer_class": NestedLRController, "net_arch": [32]})
    model.learn(total_timesteps=800)
    buffer, opt = model.replay_buffer, model.policy.optimizer
    assert isinstance(buffer, NestedReplayBuffer) and isinstance(opt, NestedLRController)
    assert opt.updates > 100 and bool(opt._td.abs().sum() > 0)  # TD features reached the controller
    assert buffer.priorities[:800].std() > 0 and int((buffer.memory.episodic_importance >= 0).sum()) > 0
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
