"""NestedExperienceMemory: the gate routes items to the levels by importance, each level keeps
what it should (a ring of recent items, the most important compressed items, a learnt linear
pattern), reads have the right shapes and train the level mixture, and the gate learns."""

from __future__ import annotations

import math

import pytest
import torch

from nestlearn.agents.experience import NestedExperienceMemory

pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_importance(memory: NestedExperienceMemory, p: float) -> None:
    with torch.no_grad():
        memory.gate[2].weight.zero_()
        memory.gate[2].bias.fill_(math.log(p / (1 - p)))


@pytest.mark.parametrize(("p", "levels"), [(0.3, ("working",)), (0.6, ("working", "episodic")),
                                           (0.9, ("working", "episodic", "semantic"))])
def test_the_gate_routes_items_by_importance(p: float, levels: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    memory = NestedExperienceMemory(8, 4, working_size=16, episodic_size=32)
    fixed_importance(memory, p)
    keys, values = torch.randn(10, 8), torch.randn(10, 4)
    routed = memory.write(keys, values)
    assert torch.allclose(routed["importance"], torch.full((10,), p))
    for level in ("working", "episodic", "semantic"):
        assert bool(routed[level].all()) == (level in levels) and bool(routed[level].any()) == (level in levels)
    assert int((memory.episodic_importance >= 0).sum()) == (10 if "episodic" in levels else 0)
    assert bool(memory.semantic.abs().sum() > 0) == ("semantic" in levels)


def test_working_memory_keeps_the_most_recent_items_exactly() -> None:
    memory = NestedExperienceMemory(4, 2, working_size=8)
    keys, values = torch.randn(11, 4), torch.randn(11, 2)
    for i in range(11):
        memory.write(keys[i:i + 1], values[i:i + 1])
    kept = {tuple(k.tolist()) for k in memory.working_keys}
    assert kept == {tuple(k.tolist()) for k in keys[3:]}


def test_a_full_episodic_memory_evicts_its_least_important_item() -> None:
    memory = NestedExperienceMemory(4, 2, episodic_size=3, episodic_threshold=0.1, semantic_threshold=1.0)
    for p in (0.5, 0.2, 0.7):
        fixed_importance(memory, p)
        memory.write(torch.randn(1, 4), torch.randn(1, 2))
    fixed_importance(memory, 0.4)
    memory.write(torch.full((1, 4), 9.0), torch.randn(1, 2))
    assert sorted(round(x, 4) for x in memory.episodic_importance.tolist()) == [0.4, 0.5, 0.7]
    fixed_importance(memory, 0.3)  # not more important than anything kept: dropped
    memory.write(torch.full((1, 4), -9.0), torch.randn(1, 2))
    assert not bool((memory.episodic_keys == -9.0).all(dim=1).any())


def test_the_semantic_memory_learns_a_linear_pattern() -> None:
    torch.manual_seed(0)
    target = torch.randn(3, 6)
    memory = NestedExperienceMemory(6, 3, semantic_threshold=0.5, episodic_threshold=0.5)
    fixed_importance(memory, 0.9)
    errors = []
    for _ in range(40):
        keys = torch.randn(5, 6)
        memory.write(keys, keys @ target.T)
        errors.append(float((memory.semantic - target).norm()))
    assert errors[-1] < 0.01 * errors[0]
    query = torch.randn(2, 6)
    torch.testing.assert_close(memory.level_reads(query)[:, 2], query @ target.T, atol=0.05, rtol=0.05)


def test_reads_have_their_shapes_and_train_the_level_mixture() -> None:
    memory = NestedExperienceMemory(8, 4)
    empty = memory.retrieve(torch.randn(5, 8))
    assert empty.shape == (5, 4) and bool((empty == 0).all())
    fixed_importance(memory, 0.9)
    memory.write(torch.randn(20, 8), torch.randn(20, 4))
    out = memory.retrieve(torch.randn(5, 8))
    assert out.shape == (5, 4) and memory.level_reads(torch.randn(5, 8)).shape == (5, 3, 4)
    out.pow(2).sum().backward()
    assert memory.level_logits.grad is not None and bool(memory.level_logits.grad.abs().sum() > 0)
    assert memory.compress.weight.grad is not None and bool(memory.compress.weight.grad.abs().sum() > 0)
    assert sum(memory.level_weights().values()) == pytest.approx(1.0)


def test_the_gate_learns_an_importance_signal() -> None:
    torch.manual_seed(0)
    memory = NestedExperienceMemory(4, 2)
    optimizer = torch.optim.Adam(memory.gate.parameters(), lr=0.05)
    for _ in range(200):
        keys, values = torch.randn(64, 4), torch.randn(64, 2)
        targets = (keys[:, 0] > 0).float()  # e.g. items whose TD error was large
        optimizer.zero_grad()
        memory.gate_loss(keys, values, targets).backward()
        optimizer.step()
    keys, values = torch.randn(256, 4), torch.randn(256, 2)
    scores = memory.importance(keys, values)
    assert float(scores[keys[:, 0] > 0.5].mean()) > 0.8 and float(scores[keys[:, 0] < -0.5].mean()) < 0.2


def test_bad_sizes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"thresholds \(episodic 0.9, semantic 0.5\) must satisfy"):
        NestedExperienceMemory(4, 2, episodic_threshold=0.9, semantic_threshold=0.5)
    with pytest.raises(ValueError, match=r"must be >= 1 \(got 0, 2, 64, 1024\)"):
        NestedExperienceMemory(0, 2)
