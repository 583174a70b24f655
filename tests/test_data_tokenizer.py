"""Tokenizer training, metadata and the exact round trip that source code needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nestlearn.config.schema import TokenizerConfig
from nestlearn.data import DataError, Tokenizer, load_tokenizer, train_tokenizer
from nestlearn.data.corpus import open_source
from nestlearn.data.tokenizer import sample_lines
from nestlearn.utils.io import read_json, sha256_file

CFG = TokenizerConfig(vocab_size=512, max_sentences=5000)


@pytest.fixture(scope="module")
def stdlib_texts() -> dict[str, str]:
    return {d.doc_id: d.text for d in open_source("stdlib").documents()}


@pytest.fixture(scope="module")
def tokenizer(stdlib_texts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    texts = [stdlib_texts[k] for k in sorted(stdlib_texts)[:200]]
    out = tmp_path_factory.mktemp("tok") / "stdlib512"
    return load_tokenizer(train_tokenizer(texts, CFG, out))


def pick(texts: dict[str, str], test: Callable[[str], bool], n: int = 2) -> list[str]:
    return [k for k in sorted(texts) if test(texts[k])][:n]


def test_round_trip_on_real_stdlib_files(tokenizer: Tokenizer, stdlib_texts: dict[str, str]) -> None:
    chosen = (pick(stdlib_texts, lambda t: any(ord(c) > 127 for c in t))
              + pick(stdlib_texts, lambda t: "\n\n\n" in t and "        " in t)
              + pick(stdlib_texts, lambda t: "\r" in t, n=1)
              + [k for k in ("textwrap.py", "json/decoder.py", "unicodedata.py") if k in stdlib_texts])
    assert len(chosen) >= 6
    texts = [stdlib_texts[n] for n in chosen]
    texts.append(stdlib_texts[chosen[-1]].replace("    ", "\t"))  # the stdlib has no tabs
    for name, text in zip([*chosen, "tab-indented"], texts, strict=True):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, name
        assert len(ids) < len(text)  # it actually compresses
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("text", [
    "", "\n", "  lead and trail  \n\n", "\tdef f(x):\r\n\t\treturn '日本語 🎉'\n",
    "a \u2581 b\u2581\u2581c", "nul\x00 del\x7f nbsp\u00a0 e\u0301", "1234567890 3.14159e-10",
])
def test_round_trip_on_edge_cases(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_eos_is_a_special_id_not_produced_by_text(tokenizer: Tokenizer) -> None:
    assert 0 <= tokenizer.eos_id < tokenizer.vocab_size
    assert tokenizer.eos_id not in tokenizer.encode("</s> end of text </s>\n")
    assert tokenizer.decode([*tokenizer.encode("a"), tokenizer.eos_id]) == "a"


def test_tiny_corpus_tokenizer_files_and_metadata(tmp_path: Path) -> None:
    docs = [f"def f{i}(x):\n    return x * {i}  # note {i}\n\n" for i in range(300)]
    path = train_tokenizer(docs, TokenizerConfig(vocab_size=400, model_type="bpe",
                                                 max_sentences=1000), tmp_path / "tiny")
    assert path == tmp_path / "tiny" / "tokenizer.model"
    meta = read_json(tmp_path / "tiny" / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tiny")
    assert meta["sha256"] == sha256_file(path) == tok.sha256
    assert meta["model_type"] == "bpe" and meta["vocab_size"] == tok.vocab_size <= 400
    for doc in [*docs[:20], "".join(docs)]:
        assert tok.decode(tok.encode(doc)) == doc
    again = train_tokenizer(docs, TokenizerConfig(vocab_size=400, model_type="bpe",
                                                  max_sentences=1000), tmp_path / "again")
    assert sha256_file(again) == tok.sha256  # training is deterministic


def test_line_sample_is_deterministic_and_capped() -> None:
    texts = ["\n".join(f"line {d}-{i}" for i in range(100)) + "\n\n   \n" for d in range(50)]
    sample = sample_lines(texts, 1000)
    assert len(sample) == 1000 and sample == sample_lines(texts, 1000)
    assert all(line.strip() for line in sample)
    assert len(sample_lines(texts, 10_000)) == 5000


def test_too_small_vocabulary_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(["some text\n"] * 10, TokenizerConfig(vocab_size=64, max_sentences=1000),
                        tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_loading_a_missing_or_bad_model_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no tokenizer model"):
        load_tokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
