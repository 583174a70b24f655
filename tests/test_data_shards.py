"""Token shards, their manifest and checksums, and `prepare_data` reuse / rebuild."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nestlearn.config.schema import DataConfig, FilterConfig, TokenizerConfig
from nestlearn.data import DataError, PreparedData, load_tokenizer, open_shards, prepare_data
from nestlearn.data.shards import ShardWriter
from nestlearn.utils.io import read_json, sha256_file


def write_shards(out: Path, docs: list[list[int]], vocab: int = 1000,
                 shard_tokens: int = 10) -> dict[str, Any]:
    out.mkdir(parents=True)
    writer = ShardWriter(out, vocab_size=vocab, eos_id=1, shard_tokens=shard_tokens)
    for doc in docs:
        writer.add(doc)
    return writer.finish("tok-sha", {"characters": 7, "bytes": 9})


def test_shards_manifest_and_logical_stream(tmp_path: Path) -> None:
    docs = [list(range(10, 17)), [500, 501], list(range(20, 34))]
    manifest = write_shards(tmp_path / "s", docs)
    expected = np.array([t for d in docs for t in [*d, 1]])
    assert manifest["total_tokens"] == len(expected) == 26
    assert manifest["documents"] == 3 and manifest["dtype"] == "uint16"
    assert [s["tokens"] for s in manifest["shards"]] == [10, 10, 6]
    assert read_json(tmp_path / "s" / "manifest.json") == manifest
    for shard in manifest["shards"]:
        assert sha256_file(tmp_path / "s" / shard["file"]) == shard["sha256"]
    stream = open_shards(tmp_path / "s", "tok-sha")
    assert len(stream) == 26
    assert np.array_equal(stream.read(0, 26), expected)
    assert np.array_equal(stream.read(8, 13), expected[8:21])  # spans three shards
    with pytest.raises(IndexError):
        stream.read(20, 7)


def test_large_vocabulary_uses_uint32(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path / "s", [[70_000, 3]], vocab=100_000)
    assert manifest["dtype"] == "uint32"
    assert open_shards(tmp_path / "s").read(0, 3).tolist() == [70_000, 3, 1]


def test_corrupted_truncated_or_foreign_shards_are_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", [list(range(2, 30))])
    with pytest.raises(DataError, match="another tokenizer"):
        open_shards(tmp_path / "s", "other-sha")
    shard = tmp_path / "s" / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00001.bin is corrupted: sha256 mismatch; delete"):
        open_shards(tmp_path / "s")
    open_shards(tmp_path / "s", verify=False)  # sizes still match: only the hash can tell
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="missing or truncated"):
        open_shards(tmp_path / "s", verify=False)
    with pytest.raises(DataError, match=r"no readable manifest\.json"):
        open_shards(tmp_path / "elsewhere")


def make_corpus(root: Path, n: int = 60) -> Path:
    rng = random.Random(0)
    names = ["alpha", "beta", "gamma", "delta", "value", "items", "result", "count"]
    for i in range(n):
        body = "".join(f"    {rng.choice(names)}_{j} = {rng.choice(names)}({j}, {i})\n"
                       for j in range(rng.randint(5, 30)))
        (root / f"mod_{i:03d}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"mod_{i:03d}.py").write_text(f"def function_{i}(x):\n{body}    return x\n")
    return root


def tiny_config(tmp_path: Path, **kw: Any) -> DataConfig:
    cfg = DataConfig(sources=[str(make_corpus(tmp_path / "corpus"))], val_fraction=0.2,
                     artifacts_dir=str(tmp_path / "art"), shard_tokens=2048,
                     tokenizer=TokenizerConfig(vocab_size=320, max_sentences=1000))
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def files_with_mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_writes_stats_and_reuses_then_rebuilds(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    messages: list[str] = []
    first = prepare_data(cfg, progress=False, log=messages.append)
    assert isinstance(first, PreparedData)
    assert first.root.parent == tmp_path / "art" / "data"
    assert first.tokenizer_path.parent.parent == tmp_path / "art" / "tokenizer"
    stats = read_json(first.root / "stats.json")
    assert stats == first.stats
    source = stats["sources"][first.source_names[0]]
    assert source["train"]["documents_kept"] + source["val"]["documents_kept"] == 60
    assert source["val"]["documents_kept"] > 0
    assert 0 < stats["unigram_entropy_nats"] < np.log(first.vocab_size)
    for split in ("train", "val"):
        manifest = read_json(first.shard_dir(0, split) / "manifest.json")
        assert manifest["total_tokens"] == source[split]["tokens"] > 0
        assert manifest["tokenizer_sha256"] == first.tokenizer_sha256
        assert stats["bytes_per_token"][split] == pytest.approx(
            source[split]["bytes"] / source[split]["tokens"])
    tok = load_tokenizer(first.tokenizer_path)
    stream = open_shards(first.shard_dir(0, "train"), first.tokenizer_sha256)
    ids = stream.read(0, len(stream)).tolist()
    first_doc = ids[: ids.index(tok.eos_id)]
    assert tok.decode(first_doc).startswith("def function_")

    before = files_with_mtimes(tmp_path / "art")
    messages.clear()
    second = prepare_data(cfg, progress=False, log=messages.append)
    assert second == first
    assert files_with_mtimes(tmp_path / "art") == before  # nothing retrained or rewritten
    assert any("reusing tokenizer" in m for m in messages)

    shard = first.shard_dir(0, "train") / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x01
    shard.write_bytes(bytes(data))
    messages.clear()
    third = prepare_data(cfg, progress=False, log=messages.append)
    assert any("rebuilding" in m and "sha256 mismatch" in m for m in messages)
    assert third.stats == first.stats
    assert sha256_file(shard) == read_json(shard.parent / "manifest.json")["shards"][0]["sha256"]
    assert os.stat(first.tokenizer_path).st_mtime_ns == before[str(first.tokenizer_path)]


def test_changed_corpus_gets_a_new_fingerprint(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    first = prepare_data(cfg, progress=False, log=lambda _m: None)
    extra = Path(cfg.sources[0]) / "mod_new.py"
    extra.write_text("def added():\n    return 'a new file changes the corpus'\n")
    second = prepare_data(cfg, progress=False, log=lambda _m: None)
    assert second.root != first.root and first.root.exists()


def test_given_tokenizer_path_is_loaded_not_trained(tmp_path: Path) -> None:
    first = prepare_data(tiny_config(tmp_path), progress=False, log=lambda _m: None)
    cfg = tiny_config(tmp_path, filter=FilterConfig(min_chars=10))
    cfg.tokenizer.path = str(first.tokenizer_path)
    second = prepare_data(cfg, progress=False, log=lambda _m: None)
    assert second.tokenizer_path == first.tokenizer_path
    assert second.tokenizer_sha256 == first.tokenizer_sha256 and second.root != first.root


def test_prepare_on_capped_default_corpus(tmp_path: Path) -> None:
    cfg = DataConfig(artifacts_dir=str(tmp_path / "art"), max_chars_per_source=150_000,
                     tokenizer=TokenizerConfig(vocab_size=512, max_sentences=2000))
    data = prepare_data(cfg, progress=False, log=lambda _m: None)
    assert data.source_names == ["stdlib"] and data.weights == [1.0]
    train = data.stats["sources"]["stdlib"]["train"]
    assert 100_000 < train["characters"] < 400_000
    assert 1.5 < data.stats["bytes_per_token"]["train"] < 6.0
    assert data.stats["sources"]["stdlib"]["val"]["documents_kept"] >= 1
