"""Document filters, caps and the counts they leave in the stats."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from nestlearn.config.schema import DataConfig, FilterConfig
from nestlearn.data import DataError
from nestlearn.data.corpus import open_source
from nestlearn.data.filter import DocumentFilter, MinHashIndex, empty_stats, filtered_documents

WORDS = [f"w{i}" for i in range(500)]


def prose(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_length_and_exact_duplicate_filters() -> None:
    f = DocumentFilter(FilterConfig(min_chars=5, max_chars=20, dedup=True))
    assert f.reason_to_drop("abc") == "too_short"
    assert f.reason_to_drop("x" * 21) == "too_long"
    assert f.reason_to_drop("hello world") is None
    assert f.reason_to_drop("hello world") == "duplicate"
    assert f.reason_to_drop("hello there") is None
    assert DocumentFilter(FilterConfig(min_chars=5, dedup=False)).reason_to_drop("same!") is None


def test_near_duplicates_are_dropped_and_distinct_texts_kept() -> None:
    f = DocumentFilter(FilterConfig(min_chars=1, near_dedup=True, near_dedup_threshold=0.8))
    base = prose(0)
    edited = base.replace(base.split()[150], "changed", 1)
    assert f.reason_to_drop(base) is None
    assert f.reason_to_drop(edited) == "near_duplicate"
    assert f.reason_to_drop(prose(1)) is None
    assert f.reason_to_drop(prose(2)) is None


def test_minhash_similarity_tracks_jaccard() -> None:
    index = MinHashIndex(threshold=0.5, num_perm=256)
    words = prose(3, 400).split()
    a, b = " ".join(words[:300]), " ".join(words[100:400])  # shingles overlap ≈ 196/404
    agreement = float(np.mean(index.signature(a) == index.signature(b)))
    assert 0.35 < agreement < 0.65
    assert float(np.mean(index.signature(a) == index.signature(prose(4)))) < 0.1


def test_filtered_documents_counts_every_decision(tmp_path: Path) -> None:
    texts = {"a.txt": "x" * 100, "b.txt": "x" * 100, "c.txt": "short", "d.txt": "y" * 100,
             "e.txt": "z" * 100}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "f.txt").write_bytes(b"\xff\xfe bad")
    cfg = DataConfig(sources=[str(tmp_path)], val_fraction=0.3, filter=FilterConfig(min_chars=10))
    stats = empty_stats()
    kept = list(filtered_documents(open_source(str(tmp_path)), cfg, stats))
    assert sorted(d.doc_id for _, d in kept) == ["a.txt", "d.txt", "e.txt"]
    total_dropped = stats["train"].dropped + stats["val"].dropped
    assert total_dropped == {"duplicate": 1, "too_short": 1, "not_utf8": 1}
    assert sum(s.documents_seen for s in stats.values()) == 6
    assert sum(s.characters for s in stats.values()) == 300
    for split, doc in kept:
        assert stats[split].documents_kept >= 1 and doc.source == open_source(str(tmp_path)).name
    record = stats["train"].to_dict()
    assert set(record) == {"documents_seen", "documents_kept", "dropped", "characters", "bytes",
                           "tokens"}


def test_caps_limit_documents_and_characters_per_source(tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"{i:03d}.txt").write_text(prose(i, 40))
    by_docs = DataConfig(sources=[str(tmp_path)], val_fraction=0.2, max_docs=20)
    by_chars = DataConfig(sources=[str(tmp_path)], val_fraction=0.2, max_chars_per_source=5000)
    for cfg in (by_docs, by_chars):
        kept = list(filtered_documents(open_source(str(tmp_path)), cfg, empty_stats()))
        chars = sum(len(d.text) for _, d in kept)
        assert {s for s, _ in kept} == {"train", "val"}
        assert len(kept) < 200
    assert len(list(filtered_documents(open_source(str(tmp_path)), by_docs, empty_stats()))) <= 20
    assert chars < 5000 + 2 * 400  # each split may overshoot by at most one document


def test_language_filter_needs_langdetect() -> None:
    if importlib.util.find_spec("langdetect") is not None:
        f = DocumentFilter(FilterConfig(min_chars=1, language="en"))
        assert f.reason_to_drop("Ceci est une phrase écrite en français, pas en anglais.") == "language"
        return
    with pytest.raises(DataError, match="langdetect"):
        DocumentFilter(FilterConfig(language="en"))
