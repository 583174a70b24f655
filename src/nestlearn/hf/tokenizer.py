"""`NestlearnTokenizer`: nestlearn's SentencePiece tokenizer as a transformers (slow) tokenizer.

Text goes through `nestlearn.data.tokenizer.Tokenizer` whole, so ids are exactly nestlearn's
(no normalisation, byte fallback, "\\n" pieces, a literal "▁" as bytes) and decoding gives the
text back byte for byte. Nothing is added around a text: nestlearn has no BOS, and the end of
sequence ("</s>") only separates documents. Special-token strings inside a text are encoded as
plain text, as nestlearn does (`split_special_tokens=False` would match them instead).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from nestlearn.data.tokenizer import MODEL_FILE, Tokenizer


class NestlearnTokenizer(PreTrainedTokenizer):
    """``vocab_file``: a nestlearn ``tokenizer.model``."""

    vocab_files_names = {"vocab_file": MODEL_FILE}  # noqa: RUF012 (transformers' API)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        self.codec = Tokenizer(vocab_file)
        self.vocab_file = vocab_file
        kwargs.setdefault("eos_token", self.codec.id_to_piece(self.codec.eos_id))
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.codec.id_to_piece(i): i for i in range(self.codec.vocab_size)}
        vocab.update(self.get_added_vocab())
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self.codec.id_to_piece(i) for i in self.codec.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self.codec.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.codec.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Runs of pieces decoded by nestlearn; special and added tokens written as they are."""
        added = self.get_added_vocab()
        parts: list[str] = []
        run: list[int] = []
        for token in tokens:
            if token in added:
                parts += [self.codec.decode(run), token]
                run = []
            else:
                run.append(self.codec.piece_to_id(token))
        parts.append(self.codec.decode(run))
        return "".join(parts)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        out = Path(save_directory) / f"{prefix}{MODEL_FILE}"
        if out.resolve() != Path(self.vocab_file).resolve():
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)
