"""MQAR data (Zoology's definition): keys and values from disjoint halves, every key queried
once at an even offset of the query region, gaps by the power law, answers right."""

from __future__ import annotations

import pytest
import torch

from nestlearn.eval.mqar import IGNORE, MQARConfig, answer_accuracy, gap_probabilities, mqar_batch


def batch(cfg: MQARConfig, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return mqar_batch(cfg, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_layout_keys_values_and_answers(random_non_queries: bool) -> None:
    cfg = MQARConfig(seq_len=64, num_pairs=8, vocab_size=256, random_non_queries=random_non_queries)
    inputs, targets = batch(cfg)
    assert inputs.shape == targets.shape == (64, 64)
    keys, values = inputs[:, 0:16:2], inputs[:, 1:16:2]
    assert ((keys >= 1) & (keys < 128)).all() and ((values >= 128) & (values < 256)).all()
    for row in range(64):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist(), strict=True))
        assert len(pairs) == 8  # distinct keys
        answered = (targets[row] != IGNORE).nonzero().flatten().tolist()
        assert len(answered) == 8 and all(t >= 16 and (t - 16) % 2 == 0 for t in answered)
        assert sorted(inputs[row, answered].tolist()) == sorted(pairs)  # every key queried once
        assert all(targets[row, t].item() == pairs[inputs[row, t].item()] for t in answered)
        filler = [t for t in range(16, 64) if t not in answered]
        if not random_non_queries:
            assert (inputs[row, filler] == 0).all()
    assert (targets[:, :16] == IGNORE).all()


def test_gaps_follow_the_power_law() -> None:
    cfg = MQARConfig(seq_len=40, num_pairs=1, vocab_size=64, power_a=0.01)  # 19 slots, one query
    _, targets = batch(cfg, n=20000)
    slot = ((targets != IGNORE).nonzero()[:, 1] - 2) // 2
    freq = torch.bincount(slot, minlength=cfg.space).double() / 20000
    torch.testing.assert_close(freq, gap_probabilities(cfg.space, 0.01), atol=0.012, rtol=0)
    assert freq[0] > 3 * freq[-1]  # short gaps are far more likely
    uniform = MQARConfig(seq_len=40, num_pairs=1, vocab_size=64, power_a=1.0)
    torch.testing.assert_close(gap_probabilities(uniform.space, 1.0), torch.full((19,), 1 / 19, dtype=torch.float64))


def test_the_same_seed_gives_the_same_data() -> None:
    cfg = MQARConfig(seq_len=32, num_pairs=4, vocab_size=64)
    a, b = batch(cfg, seed=3), batch(cfg, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], batch(cfg, seed=4)[0])


def test_accuracy_counts_only_answers() -> None:
    targets = torch.tensor([[IGNORE, 5, IGNORE, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 5] = logits[0, 3, 2] = 1.0
    logits[0, 0, 9] = 1.0  # a non-answer position: not counted
    assert answer_accuracy(logits, targets).item() == 0.5


@pytest.mark.parametrize("bad", [{"seq_len": 63}, {"num_pairs": 17}, {"num_pairs": 0},
                                 {"vocab_size": 64}, {"power_a": 0.0}])
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        MQARConfig(**{"seq_len": 64, "num_pairs": 8, "vocab_size": 256, **bad})  # type: ignore[arg-type]
