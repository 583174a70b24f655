"""SentencePiece tokenizer with an exact round trip, trained on lines of the training split.

Source code must come back byte for byte, so normalisation is off, whitespace is kept, unknown
characters fall back to bytes, and "\\n" is a user-defined piece: training sees single lines,
yet a whole document (newlines included) encodes. SentencePiece shows spaces as "▁" and would
decode a literal "▁" as a space, so a literal "▁" is encoded as its three byte pieces.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from nestlearn.config.schema import TokenizerConfig
from nestlearn.data.errors import DataError
from nestlearn.utils.io import atomic_directory, atomic_write_json, read_json, sha256_file

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
_SPACE_MARK = "\u2581"
_THREADS = 2


def sample_lines(texts: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """Up to `max_sentences` non-blank lines, a uniform reservoir sample fixed by `seed`."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                slot = rng.randrange(seen)
                if slot < max_sentences:
                    sample[slot] = line
    return sample


def _trainer_options(cfg: TokenizerConfig) -> dict[str, Any]:
    return {
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
        "character_coverage": cfg.character_coverage,
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "add_dummy_prefix": False, "byte_fallback": True, "split_digits": True,
        "allow_whitespace_only_pieces": True, "user_defined_symbols": ["\n"],
        "unk_id": 0, "eos_id": 1, "bos_id": -1, "pad_id": -1,
        # A small corpus may not support the requested vocabulary: take what it supports.
        "hard_vocab_limit": False, "max_sentence_length": 16384,
        "num_threads": _THREADS, "minloglevel": 2,
    }


def train_tokenizer(texts_iter: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path,
                    *, meta: dict[str, Any] | None = None) -> Path:
    """Train on a deterministic sample of lines of `texts_iter`; returns `out_dir/tokenizer.model`.

    `out_dir` is replaced atomically, with `tokenizer.json` (vocab size, type, sha256, plus
    `meta`) beside the model.
    """
    lines = sample_lines(texts_iter, cfg.max_sentences)
    if not lines:
        raise DataError(f"cannot train a tokenizer for {out_dir}: the training split has no text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                       **_trainer_options(cfg))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"tokenizer training for {out_dir} failed ({detail}); byte fallback "
                        "needs vocab_size >= 259 + distinct characters: raise "
                        "data.tokenizer.vocab_size or lower character_coverage") from None
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        tok = Tokenizer(tmp / MODEL_FILE)
        atomic_write_json(tmp / META_FILE, {
            "model_type": cfg.model_type, "vocab_size": tok.vocab_size,
            "requested_vocab_size": cfg.vocab_size, "sha256": tok.sha256,
            "eos_id": tok.eos_id, "training_lines": len(lines), **(meta or {})})
    return out_dir / MODEL_FILE


def reusable_tokenizer(out_dir: Path, expected_meta: dict[str, Any]) -> bool:
    """True if `out_dir` holds a model matching its recorded hash and `expected_meta`."""
    model = out_dir / MODEL_FILE
    try:
        meta = read_json(out_dir / META_FILE)
        return bool(meta["sha256"] == sha256_file(model)
                    and all(meta.get(k) == v for k, v in expected_meta.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


class Tokenizer:
    """A loaded SentencePiece model; `sha256` identifies it in shard manifests."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError):
            raise DataError(f"{self.path} is not a readable SentencePiece model; "
                            "point data.tokenizer.path at a .model file or delete it to retrain"
                            ) from None
        self.sha256 = sha256_file(self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(f"{self.path} defines no end-of-sequence piece; retrain it with eos")
        self._mark_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        plain = [t for t in texts if _SPACE_MARK not in t]
        encoded = iter(self._sp.encode(plain, num_threads=_THREADS) if plain else [])
        return [self._encode_marked(t) if _SPACE_MARK in t else next(encoded) for t in texts]

    def _encode_marked(self, text: str) -> list[int]:
        """Encode the parts between literal "▁"s, joined by the byte pieces of "▁"."""
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPACE_MARK)):
            if i:
                ids.extend(self._mark_bytes)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return str(self._sp.decode([int(i) for i in ids]))

    def id_to_piece(self, token_id: int) -> str:
        """The piece of an id, as SentencePiece writes it ("▁" for a space, "<0xE2>" for a byte)."""
        return str(self._sp.id_to_piece(int(token_id)))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (the unknown piece's id for a string that is not one)."""
        return int(self._sp.piece_to_id(piece))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a `.model` file or a directory holding `tokenizer.model`."""
    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise DataError(f"no tokenizer model at {model}; train one with `nestlearn prepare` "
                        "or fix data.tokenizer.path")
    return Tokenizer(model)
