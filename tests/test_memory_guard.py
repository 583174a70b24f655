"""A bad input cannot poison an in-context memory: inf/NaN entries are learnt from as zeros (a
blank token), so the state a call hands on stays finite and later reads stay finite."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from nestlearn.config.schema import CMSConfig
from nestlearn.memory import NeuralMemory, NeuralMemoryConfig, SelfRefTitans, SelfRefTitansConfig
from nestlearn.models.cms import ContinuumMemory

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(tree: Any) -> list[Tensor]:
    """Every tensor in a state (dataclasses, tuples and lists of them)."""
    if isinstance(tree, Tensor):
        return [tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in tensors(getattr(tree, f.name))]
    if isinstance(tree, list | tuple):
        return [t for item in tree for t in tensors(item)]
    return []


def poisoned(x: Tensor) -> tuple[Tensor, Tensor]:
    """x with a NaN and an inf planted, and x with the same entries zeroed."""
    bad, zeroed = x.clone(), x.clone()
    bad[0, 5, 1], bad[1, 9, 3] = math.nan, math.inf
    zeroed[0, 5, 1], zeroed[1, 9, 3] = 0.0, 0.0
    return bad, zeroed


LAYERS = {
    "titans_memory": lambda: NeuralMemory(NeuralMemoryConfig(d_model=8, heads=2, head_dim=4, chunk_size=4)),
    "self_referential": lambda: SelfRefTitans(SelfRefTitansConfig(d_model=8, heads=2, head_dim=4,
                                                                  memory_chunk_size=4, other_chunk_size=4)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_inf_and_nan_inputs_leave_a_finite_state(name: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    x = torch.randn(2, 14, 8, dtype=torch.float64)
    bad, zeroed = poisoned(x)
    with torch.no_grad():
        _, state = layer(bad)
        _, expected = layer(zeroed)
        assert all(torch.isfinite(t).all() for t in tensors(state))
        for got, want in zip(tensors(state), tensors(expected), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        later, _ = layer(torch.randn(2, 9, 8, dtype=torch.float64), state)  # the next call reads it
        assert torch.isfinite(later).all()


def test_a_non_finite_cms_gradient_is_dropped_for_its_sequence_only() -> None:
    cms = ContinuumMemory(8, 8, CMSConfig(chunk_sizes=[2], in_context=True, lr=[0.1]), 1e-6).double()
    level = cms.level_modules()[0]
    grads = (torch.ones(2, *level.mlp.gate_up.weight.shape, dtype=torch.float64),
             torch.ones(2, *level.mlp.w_out.weight.shape, dtype=torch.float64))
    grads[0][1, 0, 0] = math.nan  # sequence 1 had a bad segment
    state = cms.step(cms.initial_state(2), [grads], 2)
    delta = state.levels[0].delta
    assert all(torch.isfinite(d).all() for d in delta)
    assert bool((delta[0][0] == -0.1).all()) and bool((delta[1][0] == -0.1).all())  # sequence 0 learnt
    assert bool((delta[0][1] == 0).all()) and bool((delta[1][1] == 0).all())  # sequence 1 did not
