"""Corpus readers and the deterministic train/val split."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from nestlearn.config.schema import DataConfig, FilterConfig
from nestlearn.data import DataError, Document, prepare_data
from nestlearn.data.corpus import open_source, split_of, unique_names
from nestlearn.data.filter import empty_stats, filtered_documents


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_bytes(data.encode("utf-8"))
    return path


def collect(spec: str, text_field: str = "text") -> tuple[list[Document], Counter[str]]:
    skipped: Counter[str] = Counter()
    source = open_source(spec, text_field=text_field)
    docs = list(source.documents(lambda _id, reason: skipped.update([reason])))
    return docs, skipped


def test_default_corpus_is_stdlib_python_only() -> None:
    source = open_source("stdlib")
    assert source.name == "stdlib"
    assert len(source.files) > 100
    assert all(p.suffix == ".py" for p in source.files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in source.files)
    assert list(source.files) == sorted(source.files)
    first = next(source.documents())
    assert first.source == "stdlib" and not first.doc_id.startswith("/")
    assert source.root is not None
    assert (source.root / first.doc_id).read_bytes().decode("utf-8") == first.text


def test_split_is_deterministic_order_independent_and_near_fraction() -> None:
    source = open_source("stdlib")
    assert source.root is not None
    ids = [p.relative_to(source.root).as_posix() for p in source.files]
    first = {i: split_of(i, 0.1) for i in ids}
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {i: split_of(i, 0.1) for i in shuffled} == first
    share = sum(s == "val" for s in first.values()) / len(ids)
    assert 0.06 < share < 0.14


def test_split_of_a_file_does_not_depend_on_other_files(tmp_path: Path) -> None:
    for i in range(40):
        write(tmp_path / "c" / f"f{i:02d}.txt", f"document number {i} " * 10)
    cfg = DataConfig(sources=[str(tmp_path / "c")], val_fraction=0.3)

    def splits() -> dict[str, str]:
        stats = empty_stats()
        source = open_source(cfg.sources[0])
        return {d.doc_id: s for s, d in filtered_documents(source, cfg, stats)}

    before = splits()
    assert set(before.values()) == {"train", "val"}
    for i in range(40, 80):
        write(tmp_path / "c" / f"a{i:02d}.txt", f"another document {i} " * 10)
    after = splits()
    assert {k: after[k] for k in before} == before


def test_text_directory_reader_keeps_bytes_and_skips_binary_and_hidden(tmp_path: Path) -> None:
    write(tmp_path / "d" / "b.txt", "line one\r\nline two\n")
    write(tmp_path / "d" / "sub" / "a.md", "# title\n\n\tindented ünïcode\n")
    write(tmp_path / "d" / ".git" / "config", "hidden")
    write(tmp_path / "d" / "blob.bin", b"\x00\x01\x02binary")
    docs, skipped = collect(str(tmp_path / "d"))
    texts = {d.doc_id: d.text for d in docs}
    assert sorted(texts) == ["b.txt", "sub/a.md"]
    assert texts["b.txt"] == "line one\r\nline two\n"
    assert texts["sub/a.md"] == "# title\n\n\tindented ünïcode\n"
    assert skipped == Counter({"binary": 1})


def test_glob_and_single_file_sources(tmp_path: Path) -> None:
    write(tmp_path / "g" / "x" / "one.txt", "one")
    write(tmp_path / "g" / "y" / "two.txt", "two")
    write(tmp_path / "g" / "y" / "skip.md", "skip")
    docs, _ = collect(str(tmp_path / "g" / "**" / "*.txt"))
    assert sorted((d.doc_id, d.text) for d in docs) == [("x/one.txt", "one"), ("y/two.txt", "two")]
    single, _ = collect(str(tmp_path / "g" / "x" / "one.txt"))
    assert [(d.doc_id, d.text) for d in single] == [("one.txt", "one")]


def test_jsonl_reader_counts_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"body": "first"}), "{not json", json.dumps({"other": 1}), "",
             json.dumps({"body": "second\nline"})]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    docs, skipped = collect(str(path), text_field="body")
    assert [(d.doc_id, d.text) for d in docs] == [("data.jsonl#1", "first"),
                                                   ("data.jsonl#5", "second\nline")]
    assert skipped == Counter({"bad_json": 1, "missing_field": 1})


def test_parquet_reader(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "n": [1, 2, 3]}), path)
    docs, skipped = collect(str(path))
    assert [(d.doc_id, d.text) for d in docs] == [("data.parquet#0", "alpha"),
                                                   ("data.parquet#2", "gamma")]
    assert skipped == Counter({"missing_field": 1})
    with pytest.raises(DataError, match="no column 'body'"):
        collect(str(path), text_field="body")


def test_non_utf8_file_is_skipped_and_counted(tmp_path: Path) -> None:
    for i in range(10):
        write(tmp_path / "c" / f"ok{i}.txt", f"valid text number {i}")
    write(tmp_path / "c" / "latin1.txt", "caf\u00e9".encode("latin-1"))
    cfg = DataConfig(sources=[str(tmp_path / "c")], filter=FilterConfig(min_chars=1))
    stats = empty_stats()
    kept = list(filtered_documents(open_source(cfg.sources[0]), cfg, stats))
    assert len(kept) == 10
    assert sum(st.dropped["not_utf8"] for st in stats.values()) == 1
    assert sum(st.documents_seen for st in stats.values()) == 11


def test_missing_source_and_empty_corpus_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        open_source(str(tmp_path / "nowhere"))
    for i in range(5):
        write(tmp_path / "short" / f"{i}.txt", "tiny")
    cfg = DataConfig(sources=[str(tmp_path / "short")], artifacts_dir=str(tmp_path / "art"))
    with pytest.raises(DataError, match=r"short' has no documents after filtering") as info:
        prepare_data(cfg, progress=False, log=lambda _m: None)
    assert "\n" not in str(info.value) and "too_short" in str(info.value)


def test_a_source_without_one_of_the_splits_is_refused(tmp_path: Path) -> None:
    single = write(tmp_path / "only.txt", "a single document cannot be split by file " * 5)
    cfg = DataConfig(sources=[str(single)], artifacts_dir=str(tmp_path / "art"))
    with pytest.raises(DataError, match=r"only\.txt' has no (train|val) documents"):
        prepare_data(cfg, progress=False, log=lambda _m: None)


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: import fails
    with pytest.raises(DataError, match="needs the optional `datasets` package"):
        next(open_source("hf:wikitext:train").documents())


def test_source_names_are_stable_and_unique() -> None:
    assert unique_names(["stdlib", "data/a.jsonl", "data/a.jsonl"]) == [
        "stdlib", "data-a.jsonl-1", "data-a.jsonl-2"]


def test_capped_default_corpus_is_spread_over_the_library(tmp_path: Path) -> None:
    """Read order is a fixed shuffle, so a cap samples the whole stdlib, not its first dirs."""
    from itertools import islice

    from nestlearn.data.corpus import open_source

    first = [d.doc_id for d in islice(open_source("stdlib").documents(), 60)]
    assert first == [d.doc_id for d in islice(open_source("stdlib").documents(), 60)]
    top_dirs = {doc_id.split("/")[0] for doc_id in first}
    initials = {doc_id.lstrip("_")[0] for doc_id in first}
    assert len(top_dirs) > 10 and len(initials) > 8
