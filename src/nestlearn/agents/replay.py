"""A DQN replay buffer made of a `NestedExperienceMemory`, and the DQN that feeds it TD errors.

`NestedReplayBuffer` (a stable-baselines3 `replay_buffer_class`) stores each transition as an
item of a `NestedExperienceMemory`: key = the observation, value = (next observation, one-hot
action, reward, done). Its levels:

- working: stable-baselines3's own ring of the last `buffer_size` transitions, sampled with
  probability proportional to importance^alpha (prioritised replay, with the gate's importance
  until a transition's TD error is known);
- episodic: the memory's store of the most important transitions, kept after the ring has
  overwritten them; `episodic_fraction` of every batch comes from it;
- semantic: the memory's linear associative map from observation to (next observation, action,
  reward, done), taught by the most important transitions: a learnt model of what tends to
  follow, readable with `memory.retrieve(obs)` as context for a policy.

The gate learns from the TD errors of replayed transitions (`update_importance`, called by
`NestedDQN`): what it rates important is what the Q-network found surprising. As in prioritised
replay without importance-sampling weights, the batches are biased towards surprising
transitions; `alpha=0` samples uniformly.

`NestedDQN` is stable-baselines3's DQN with forward hooks on its Q-networks that read each
training batch's TD errors, hand them to the buffer and, when the optimizer is a
`NestedLRController`, to its controller (`observe`): its training loop is stable-baselines3's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecNormalize
from torch import Tensor, nn

from nestlearn.agents.experience import NestedExperienceMemory
from nestlearn.optim.lr_controller import NestedLRController

EPS = 1e-6


class NestedReplayBuffer(ReplayBuffer):
    """Replay buffer of three levels for discrete actions and one environment (module docstring)."""

    def __init__(self, buffer_size: int, observation_space: spaces.Space[Any], action_space: spaces.Space[Any],
                 device: torch.device | str = "auto", n_envs: int = 1, optimize_memory_usage: bool = False,
                 handle_timeout_termination: bool = True, episodic_size: int = 2048,
                 episodic_fraction: float = 0.25, alpha: float = 0.6, gate_lr: float = 1e-3,
                 episodic_threshold: float = 0.5, semantic_threshold: float = 0.8) -> None:
        if n_envs != 1 or optimize_memory_usage:
            raise ValueError(f"NestedReplayBuffer takes one environment without optimize_memory_usage "
                             f"(got n_envs={n_envs}, optimize_memory_usage={optimize_memory_usage})")
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"NestedReplayBuffer needs a Discrete action space, got {action_space}")
        if not 0.0 <= episodic_fraction < 1.0:
            raise ValueError(f"episodic_fraction={episodic_fraction} must be in [0, 1)")
        super().__init__(buffer_size, observation_space, action_space, device, n_envs,
                         optimize_memory_usage, handle_timeout_termination)
        self.obs_dim, self.n_actions = int(np.prod(self.obs_shape)), int(action_space.n)
        self.memory = NestedExperienceMemory(self.obs_dim, self.obs_dim + self.n_actions + 2,
                                             episodic_size=episodic_size, episodic_threshold=episodic_threshold,
                                             semantic_threshold=semantic_threshold)
        self.gate_optimizer = torch.optim.Adam(self.memory.gate.parameters(), lr=gate_lr)
        self.episodic_fraction, self.alpha = episodic_fraction, alpha
        self.priorities = np.zeros(self.buffer_size, dtype=np.float64)
        self.last_batch: ReplayBufferSamples | None = None
        self._last_rows: tuple[np.ndarray, Tensor, Tensor, Tensor] | None = None

    def _item(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
              done: np.ndarray) -> tuple[Tensor, Tensor]:
        key = torch.as_tensor(obs, dtype=torch.float32).reshape(-1, self.obs_dim)
        onehot = F.one_hot(torch.as_tensor(action).reshape(-1).long(), self.n_actions).float()
        value = torch.cat([torch.as_tensor(next_obs, dtype=torch.float32).reshape(-1, self.obs_dim), onehot,
                           torch.as_tensor(reward, dtype=torch.float32).reshape(-1, 1),
                           torch.as_tensor(done, dtype=torch.float32).reshape(-1, 1)], dim=1)
        return key, value

    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
            done: np.ndarray, infos: list[dict[str, Any]]) -> None:
        pos = self.pos
        super().add(obs, next_obs, action, reward, done, infos)
        routed = self.memory.write(*self._item(obs, next_obs, action, reward, done))
        self.priorities[pos] = float(routed["importance"][0])

    def sample(self, batch_size: int, env: VecNormalize | None = None) -> ReplayBufferSamples:
        filled = self.buffer_size if self.full else self.pos
        stored = torch.nonzero(self.memory.episodic_importance >= 0).flatten()
        from_episodic = min(round(self.episodic_fraction * batch_size), len(stored))
        weights = (self.priorities[:filled] + EPS) ** self.alpha
        working = np.random.choice(filled, size=batch_size - from_episodic, p=weights / weights.sum())
        samples = self._get_samples(working, env=env)
        if from_episodic:
            importance = (self.memory.episodic_importance[stored].double() + EPS) ** self.alpha
            rows = stored[torch.multinomial(importance, from_episodic, replacement=True)]
            samples = self._join(samples, self._decode(rows, env))
        else:
            rows = torch.zeros(0, dtype=torch.long)
        keys, values = self._item(samples.observations.cpu().numpy(), samples.next_observations.cpu().numpy(),
                                  samples.actions.cpu().numpy(), samples.rewards.cpu().numpy(),
                                  samples.dones.cpu().numpy())
        self.last_batch = samples
        self._last_rows = (working, rows, keys, values)
        return samples

    def _decode(self, rows: Tensor, env: VecNormalize | None) -> ReplayBufferSamples:
        """Episodic items back into transitions (the observation normalisation applied as for the ring)."""
        keys, values = self.memory.episodic_keys[rows], self.memory.episodic_values[rows]
        d, a = self.obs_dim, self.n_actions
        shape, dtype = (-1, *self.obs_shape), self.observations.dtype
        obs = np.asarray(self._normalize_obs(keys.numpy().reshape(shape).astype(dtype), env))
        next_obs = np.asarray(self._normalize_obs(values[:, :d].numpy().reshape(shape).astype(dtype), env))
        actions = values[:, d:d + a].argmax(dim=1, keepdim=True).numpy().astype(self.actions.dtype)
        rewards = self._normalize_reward(values[:, d + a:d + a + 1].numpy(), env)
        dones = values[:, d + a + 1:].numpy()
        return ReplayBufferSamples(*(self.to_torch(x) for x in (obs, actions, next_obs, dones, rewards)))

    @staticmethod
    def _join(a: ReplayBufferSamples, b: ReplayBufferSamples) -> ReplayBufferSamples:
        fields = zip((a.observations, a.actions, a.next_observations, a.dones, a.rewards),
                     (b.observations, b.actions, b.next_observations, b.dones, b.rewards), strict=True)
        return ReplayBufferSamples(*(torch.cat([x, y.to(x.dtype)]) for x, y in fields))

    def update_importance(self, td_errors: Tensor) -> float:
        """After a batch's TD errors are known: its transitions' importance becomes their |TD error|
        relative to the batch's largest, and the gate takes one step towards it; returns the gate's loss."""
        if self._last_rows is None:
            raise RuntimeError("update_importance needs a batch: call sample first")
        working, rows, keys, values = self._last_rows
        magnitude = td_errors.detach().float().abs().reshape(-1).cpu()
        target = magnitude / (magnitude.max() + EPS)
        self.priorities[working] = target[:len(working)].numpy()
        self.memory.episodic_importance[rows] = target[len(working):]
        self.gate_optimizer.zero_grad(set_to_none=True)
        loss = self.memory.gate_loss(keys, values, target)
        torch.autograd.backward(loss)
        self.gate_optimizer.step()
        self._last_rows = None
        return float(loss)


class NestedDQN(DQN):
    """stable-baselines3's DQN whose training batches' TD errors reach a `NestedReplayBuffer`
    (priorities, gate) and a `NestedLRController` (its TD features), through forward hooks."""

    def _setup_model(self) -> None:
        super()._setup_model()
        self._target: Tensor | None = None
        self.q_net_target.register_forward_hook(self._read_target)
        self.q_net.register_forward_hook(self._read_current)

    def _batch(self) -> ReplayBufferSamples | None:
        buffer = self.replay_buffer
        return buffer.last_batch if isinstance(buffer, NestedReplayBuffer) else None

    def _read_target(self, _: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        batch = self._batch()
        if batch is not None and inputs[0] is batch.next_observations:
            best = output.detach().max(dim=1, keepdim=True).values
            self._target = batch.rewards + (1 - batch.dones) * self.gamma * best

    def _read_current(self, _: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        batch = self._batch()
        if batch is None or self._target is None or inputs[0] is not batch.observations:
            return
        current, target = torch.gather(output.detach(), 1, batch.actions.long()), self._target
        self._target = None
        td = (current - target).reshape(-1)
        assert isinstance(self.replay_buffer, NestedReplayBuffer)
        self.replay_buffer.update_importance(td)
        if isinstance(self.policy.optimizer, NestedLRController):  # the loss DQN is about to minimise
            self.policy.optimizer.observe(loss=F.smooth_l1_loss(current, target), td_errors=td)
