"""Training batches (mixture, exact resume, determinism) and evaluation batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from nestlearn.config.schema import DataConfig, TokenizerConfig
from nestlearn.data import (
    BatchLoader,
    DataError,
    PreparedData,
    iter_eval_batches,
    load_tokenizer,
    prepare_data,
)


def write_source(root: Path, letters: str, seed: int) -> Path:
    """Documents whose words use only `letters`, so a window reveals its source."""
    rng = random.Random(seed)
    for i in range(40):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(120)]
        lines = [" ".join(words[j:j + 8]) for j in range(0, 120, 8)]
        (root / f"doc{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    tmp = tmp_path_factory.mktemp("loader")
    cfg = DataConfig(sources=[str(write_source(tmp / "a", "abcdef", 0)),
                              str(write_source(tmp / "p", "pqrstu", 1))],
                     weights=[3.0, 1.0], val_fraction=0.25, artifacts_dir=str(tmp / "art"),
                     tokenizer=TokenizerConfig(vocab_size=300, max_sentences=1000))
    return prepare_data(cfg, progress=False, log=lambda _m: None)


def take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_batches_have_shape_dtype_and_shifted_targets(prepared: PreparedData) -> None:
    assert prepared.weights == [0.75, 0.25]
    loader = BatchLoader(prepared, "train", 4, 32, seed=0)
    for x, y in take(loader, 5):
        assert x.shape == y.shape == (4, 32)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(x.max()) < prepared.vocab_size
    assert loader.state_dict() == {"position": 5, "seed": 0}


def test_mixture_weights_are_respected(prepared: PreparedData) -> None:
    tok = load_tokenizer(prepared.tokenizer_path)
    loader = BatchLoader(prepared, "train", 50, 16, seed=3)
    from_a = total = 0
    for x, _ in take(loader, 8):
        for row in x.tolist():
            text = tok.decode(row)
            assert set(text) & set("abcdef") == set() or set(text) & set("pqrstu") == set()
            from_a += bool(set(text) & set("abcdef"))
            total += 1
    assert 0.65 < from_a / total < 0.85


def test_resume_from_a_saved_position_is_exact(prepared: PreparedData) -> None:
    original = BatchLoader(prepared, "train", 3, 24, seed=7)
    take(original, 4)
    state = original.state_dict()
    expected = take(original, 5)
    resumed = BatchLoader(prepared, "train", 3, 24, seed=0)
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), expected)
    assert resumed.state_dict() == original.state_dict() == {"position": 9, "seed": 7}


def test_same_seed_same_batches_other_seed_other_batches(prepared: PreparedData) -> None:
    a = take(BatchLoader(prepared, "train", 2, 16, seed=1), 3)
    assert same(take(BatchLoader(prepared, "train", 2, 16, seed=1), 3), a)
    assert not same(take(BatchLoader(prepared, "train", 2, 16, seed=2), 3), a)
    it = iter(BatchLoader(prepared, "train", 2, 16, seed=1))
    assert same([next(it) for _ in range(3)], a)


def test_split_too_short_for_a_window_is_a_clear_error(prepared: PreparedData) -> None:
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1"):
        BatchLoader(prepared, "val", 2, 1_000_000)
    with pytest.raises(DataError, match="unknown split"):
        BatchLoader(prepared, "test", 2, 16)


def test_eval_batches_are_deterministic_and_disjoint(prepared: PreparedData) -> None:
    first = list(iter_eval_batches(prepared, "val", 4, 16, max_batches=3))
    second = list(iter_eval_batches(prepared, "val", 4, 16, max_batches=3))
    assert same(first, second) and len(first) == 3
    rows = [tuple(r) for x, _ in first for r in x.tolist()]
    assert len(set(rows)) == len(rows) == 12
    for x, y in first:
        assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    everything = list(iter_eval_batches(prepared, "val", 64, 16, max_batches=1000))
    assert sum(len(x) for x, _ in everything) <= sum(
        prepared.stats["sources"][n]["val"]["tokens"] // 16 for n in prepared.source_names)
    with pytest.raises(DataError, match="no window"):
        iter_eval_batches(prepared, "val", 4, 10_000_000, max_batches=1)
