"""MAD synthetic tasks (Poli et al. 2024, reference: athms/mad-lab): shapes, vocabulary, seeding,
scored positions and the property that makes each task what it is, on small settings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor

from nestlearn.eval.mad import TASKS, MADTask, fuzzy_vocab, memorization_values, recall_vocab
from nestlearn.eval.mqar import IGNORE

SMALL: dict[str, MADTask] = {
    "in_context_recall": MADTask(vocab_size=16, seq_len=32),
    "fuzzy_in_context_recall": MADTask(vocab_size=16, seq_len=48, k_motif_size=3, v_motif_size=3),
    "noisy_in_context_recall": MADTask(vocab_size=32, seq_len=32, noise_vocab_size=16, frac_noise=0.3),
    "selective_copying": MADTask(vocab_size=8, seq_len=24, num_tokens_to_copy=5),
    "compression": MADTask(vocab_size=8, seq_len=16),
    "memorization": MADTask(vocab_size=32, seq_len=16),
}
RECALL = ["in_context_recall", "noisy_in_context_recall", "fuzzy_in_context_recall"]


def make(name: str, task: MADTask | None = None, n: int = 32, seed: int = 0, training: bool = False
         ) -> tuple[Tensor, Tensor]:
    task = SMALL[name] if task is None else task
    return TASKS[name].generate(task, n, torch.Generator().manual_seed(seed), training=training)


def test_published_defaults() -> None:
    """configs/tasks/*.yml baselines over MADConfig's defaults (mad/configs.py)."""
    expected: dict[str, dict[str, Any]] = {
        "in_context_recall": dict(vocab_size=16, seq_len=128),
        "fuzzy_in_context_recall": dict(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3),
        "noisy_in_context_recall": dict(vocab_size=32, seq_len=128, noise_vocab_size=16, frac_noise=0.2),
        "selective_copying": dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16),
        "compression": dict(vocab_size=16, seq_len=32),
        "memorization": dict(vocab_size=256, seq_len=32, num_train_examples=256),
    }
    assert set(TASKS) == set(expected)
    for name, fields in expected.items():
        assert TASKS[name].defaults == MADTask(**fields), name
        assert TASKS[name].defaults.multi_query and TASKS[name].defaults.num_test_examples == 1_280
    widths = {name: spec.width(spec.defaults) for name, spec in TASKS.items()}
    assert widths == {"in_context_recall": 127, "fuzzy_in_context_recall": 128, "noisy_in_context_recall": 127,
                      "selective_copying": 256, "compression": 32, "memorization": 32}


@pytest.mark.parametrize("name", list(TASKS))
def test_published_defaults_generate(name: str) -> None:
    spec = TASKS[name]
    inputs, targets = make(name, spec.defaults, n=2)
    assert inputs.shape == targets.shape == (2, spec.width(spec.defaults))
    assert (targets != IGNORE).any()


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", list(TASKS))
def test_shape_dtype_and_vocabulary(name: str, training: bool) -> None:
    task = SMALL[name]
    inputs, targets = make(name, training=training)
    assert inputs.shape == targets.shape == (32, TASKS[name].width(task))
    assert inputs.dtype == targets.dtype == torch.long
    assert ((inputs >= 0) & (inputs < task.vocab_size)).all()
    assert (((targets >= 0) & (targets < task.vocab_size)) | (targets == IGNORE)).all()


@pytest.mark.parametrize("name", list(TASKS))
def test_seeding(name: str) -> None:
    a, b, c = make(name, seed=1), make(name, seed=1), make(name, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", RECALL)
def test_training_layout_is_next_token(name: str) -> None:
    inputs, targets = make(name, training=True)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    if name != "fuzzy_in_context_recall":  # same draws in both layouts: scored targets are next tokens
        test_inputs, test_targets = make(name)
        assert torch.equal(test_inputs, inputs)
        scored = test_targets != IGNORE
        assert torch.equal(test_targets[scored], targets[scored])


def check_recall(task: MADTask, inputs: Tensor, targets: Tensor) -> None:
    """Pairs at even positions; a key keeps its value; multi-query scores the value at the
    position of every key shown before (the last is the probe), noise never."""
    keys_r, values_r, noise_r = recall_vocab(task)
    for row in range(inputs.shape[0]):
        x, t = inputs[row].tolist(), targets[row].tolist()
        body = len(x) if task.multi_query else len(x) - 2  # single-query: copy token, probe key
        pairs: dict[int, int] = {}
        expected = [IGNORE] * len(x)
        for i in range(0, body, 2):
            k = x[i]
            if k in noise_r:
                assert i + 1 == len(x) or x[i + 1] in noise_r  # noise fills whole pairs
                continue
            assert k in keys_r
            v = x[i + 1] if i + 1 < len(x) else t[i]  # the probe's value is only a target
            assert v in values_r and pairs.setdefault(k, v) == v
            if task.multi_query and any(x[j] == k for j in range(0, i, 2)):
                expected[i] = v
        if not task.multi_query:
            assert x[-2] == task.vocab_size - 1 and x[-1] in pairs
            expected[-1] = pairs[x[-1]]
        assert t == expected
        assert t[-1] != IGNORE  # the probe is always answerable


@pytest.mark.parametrize("multi_query", [True, False])
def test_in_context_recall_values_are_earlier_pairs(multi_query: bool) -> None:
    task = replace(SMALL["in_context_recall"], multi_query=multi_query)
    inputs, targets = make("in_context_recall", task, n=64)
    check_recall(task, inputs, targets)


@pytest.mark.parametrize("multi_query", [True, False])
def test_noisy_recall_noise_is_separate(multi_query: bool) -> None:
    task = replace(SMALL["noisy_in_context_recall"], multi_query=multi_query)
    inputs, targets = make("noisy_in_context_recall", task, n=128)
    keys_r, values_r, noise_r = recall_vocab(task)
    assert set(keys_r).isdisjoint(noise_r) and set(values_r).isdisjoint(noise_r)
    assert noise_r.stop == task.vocab_size - (0 if multi_query else 1)
    check_recall(task, inputs, targets)
    is_noise = (inputs >= noise_r.start) & (inputs < noise_r.stop)
    assert (targets[is_noise] == IGNORE).all()
    pairs = task.seq_len // 2 - 1
    share = is_noise[:, 0:2 * pairs:2].float().mean().item()
    assert 0.15 < share < 0.45  # frac_noise 0.3, less the pair kept real


def runs(t: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of scored targets."""
    out, start = [], None
    for i, v in enumerate([*t, IGNORE]):
        if v != IGNORE and start is None:
            start = i
        elif v == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def contains(seq: list[int], motif: list[int]) -> bool:
    return any(seq[i:i + len(motif)] == motif for i in range(len(seq) - len(motif) + 1))


@pytest.mark.parametrize("small_keys", [False, True])
@pytest.mark.parametrize("multi_query", [True, False])
def test_fuzzy_recall_reproduces_multi_token_values(multi_query: bool, small_keys: bool) -> None:
    """Test layout: every key has k tokens; each scored run is a whole value motif whose key
    (the k tokens before it) was shown with that same value earlier in the sequence. Six
    two-token keys (``small_keys``) make repeated keys, hence scored body values, common."""
    task = replace(SMALL["fuzzy_in_context_recall"], multi_query=multi_query)
    if small_keys:
        task = replace(task, vocab_size=8 if multi_query else 9, k_motif_size=2, v_motif_size=2)
    inputs, targets = make("fuzzy_in_context_recall", task, n=64)
    if multi_query and small_keys:
        assert sum(len(runs(t)) for t in targets.tolist()) > 2 * 64  # many values besides the probe's
    keys_r, values_r, _, pad = fuzzy_vocab(task)
    k = task.k_motif_size
    for row in range(inputs.shape[0]):
        x, t = inputs[row].tolist(), targets[row].tolist()
        body = [i for i, v in enumerate(x) if v != pad]
        assert body == list(range(body[0], len(x)))  # padding only on the left
        found = runs(t)
        assert found and found[-1][1] == len(t)  # the probe's value closes the sequence
        if not multi_query:
            assert len(found) == 1
            assert x[found[0][0] - k] == task.vocab_size - 1  # copy token before the probe key
        for start, end in found:
            value = t[start:end]
            key = x[start + 1 - k:start + 1]
            assert 1 <= len(value) <= task.v_motif_size and all(v in values_r for v in value)
            assert all(v in keys_r for v in key) and len(set(key)) == k and len(set(value)) == len(value)
            assert x[start + 1:end] == value[:-1]  # the model sees the value as it emits it
            assert contains(x[:start + 1 - k], key + value)


def test_fuzzy_recall_training_uses_shorter_keys() -> None:
    task = SMALL["fuzzy_in_context_recall"]
    inputs, _ = make("fuzzy_in_context_recall", task, n=16, training=True)
    keys_r, _, _, _ = fuzzy_vocab(task)
    is_key = (inputs >= keys_r.start) & (inputs < keys_r.stop)
    # a run of key tokens shorter than k occurs somewhere (keys of 1…k tokens)
    lengths = [len(r) for row in is_key.long().tolist() for r in "".join(map(str, row)).split("0") if r]
    assert min(lengths) < task.k_motif_size


def test_selective_copying_targets_are_the_scattered_tokens() -> None:
    task = SMALL["selective_copying"]
    inputs, targets = make("selective_copying", n=64)
    n, blank, copy = task.num_tokens_to_copy, task.vocab_size - 2, task.vocab_size - 1
    split = task.seq_len - n - 1
    assert (inputs[:, split] == copy).all() and (inputs[:, split + 1:] == blank).all()
    assert (targets[:, :split + 1] == IGNORE).all()
    for row in range(64):
        region = inputs[row, :split]
        tokens = region[region != blank]
        assert len(tokens) == n and region[-1] != blank  # blanks go before tokens, never after the last
        assert torch.equal(targets[row, split + 1:], tokens)
        assert (tokens < blank).all()
    assert len({tuple((inputs[r, :split] == blank).tolist()) for r in range(64)}) > 1  # placement varies


@pytest.mark.parametrize("noise", [0, 3])
def test_compression_targets_are_the_inputs(noise: int) -> None:
    task = replace(SMALL["compression"], noise_vocab_size=noise, frac_noise=0.3 if noise else 0.0)
    inputs, targets = make("compression", task, n=64)
    assert torch.equal(inputs, targets)
    assert (inputs[:, -1] == task.vocab_size - 1).all()
    body = inputs[:, :-1]
    content = task.vocab_size - 1 - noise
    assert (body < task.vocab_size - 1).all()
    assert ((body >= content).any().item()) == bool(noise)


def test_memorization_mapping_is_fixed() -> None:
    task = SMALL["memorization"]
    table = memorization_values(task)
    half = (task.vocab_size - 1) // 2
    assert len(table) == half and len(set(table.tolist())) == half  # an injection
    assert ((table >= half) & (table < task.vocab_size - 1)).all()
    for seed in (0, 1):
        inputs, targets = make("memorization", n=64, seed=seed)
        assert (inputs[:, 1::2] == task.vocab_size - 1).all() and (targets[:, 0::2] == IGNORE).all()
        assert torch.equal(targets[:, 1::2], table[inputs[:, 0::2]])
    assert torch.equal(memorization_values(replace(task, kv_map_seed=12_345)), table)
    assert not torch.equal(memorization_values(replace(task, kv_map_seed=7)), table)


def test_memorization_noise() -> None:
    task = replace(SMALL["memorization"], noise_vocab_size=4, frac_noise=0.5)
    inputs, targets = make("memorization", task, n=64)
    content = task.vocab_size - 1 - 4
    noise = (inputs[:, 0::2] >= content) & (inputs[:, 0::2] < task.vocab_size - 1)
    assert noise.any() and (~noise).any(dim=1).all()  # one real pair in every sequence
    assert (targets[:, 1::2][noise] == IGNORE).all()
    real = ~noise
    assert torch.equal(targets[:, 1::2][real], memorization_values(task)[inputs[:, 0::2][real]])


@pytest.mark.parametrize(("name", "fields", "n", "match"), [
    ("compression", dict(frac_noise=1.0), 4, "frac_noise"),
    ("compression", dict(frac_noise=0.1), 4, "noise_vocab_size"),
    ("compression", dict(vocab_size=1), 4, "vocab_size"),
    ("compression", dict(vocab_size=4, noise_vocab_size=3), 4, "vocab_size 4"),
    ("compression", {}, 0, "num_examples"),
    ("in_context_recall", dict(seq_len=31), 4, "seq_len"),
    ("fuzzy_in_context_recall", dict(k_motif_size=8), 4, "k_motif_size 8"),
    ("fuzzy_in_context_recall", dict(seq_len=12), 4, "seq_len"),
    ("selective_copying", dict(num_tokens_to_copy=0), 4, "num_tokens_to_copy"),
    ("selective_copying", dict(seq_len=11), 4, "seq_len"),
    ("memorization", dict(seq_len=15), 4, "seq_len"),
    ("memorization", dict(k_motif_size=0), 4, "k_motif_size"),
])
def test_bad_settings_raise(name: str, fields: dict[str, Any], n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        task = replace(SMALL[name], **fields)
        TASKS[name].generate(task, n, torch.Generator().manual_seed(0))
