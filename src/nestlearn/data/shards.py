"""Token shards: documents' ids joined by eos in flat uint16/uint32 files, plus a manifest.

A split of a source is a directory of `shard_NNNNN.bin` files and `manifest.json` (counts,
sha256 per shard, the tokenizer's sha256). Readers memory-map the files, so a corpus of any
size opens instantly; checksums catch a truncated or altered shard before training on it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestlearn.data.errors import DataError
from nestlearn.utils.io import atomic_write_json, read_json, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class ShardWriter:
    """Appends documents (ids + eos) to shards of at most `shard_tokens` tokens in `out_dir`.

    It writes into `out_dir` directly: callers pass a temporary directory (`atomic_directory`)
    so that a split appears complete or not at all.
    """

    def __init__(self, out_dir: Path, *, vocab_size: int, eos_id: int, shard_tokens: int) -> None:
        self.out_dir, self.eos_id, self.shard_tokens = Path(out_dir), eos_id, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self._buffer = array("H" if self.dtype == np.uint16 else "I")
        self._shards: list[dict[str, Any]] = []
        self.documents = 0

    @property
    def tokens(self) -> int:
        """Tokens written so far, eos separators included."""
        return sum(int(s["tokens"]) for s in self._shards) + len(self._buffer)

    def add(self, ids: Sequence[int]) -> None:
        self._buffer.extend(ids)
        self._buffer.append(self.eos_id)
        self.documents += 1
        while len(self._buffer) >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, count: int) -> None:
        data = np.frombuffer(self._buffer, dtype=self.dtype, count=count).tobytes()
        name = f"shard_{len(self._shards):05d}.bin"
        (self.out_dir / name).write_bytes(data)
        self._shards.append({"file": name, "tokens": count,
                             "sha256": hashlib.sha256(data).hexdigest()})
        del self._buffer[:count]

    def finish(self, tokenizer_sha256: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Write the last shard and the manifest; returns the manifest."""
        if self._buffer:
            self._flush(len(self._buffer))
        manifest = {
            "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
            "tokenizer_sha256": tokenizer_sha256, "eos_id": self.eos_id,
            "shards": self._shards, "total_tokens": self.tokens,
            "documents": self.documents, **extra,
        }
        atomic_write_json(self.out_dir / MANIFEST, manifest)
        return manifest


class TokenStream:
    """Read-only view of a split's shards as one logical token sequence."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root, self.manifest = root, manifest
        dtype = np.dtype(manifest["dtype"])
        self.arrays = [np.memmap(root / s["file"], dtype=dtype, mode="r")
                       for s in manifest["shards"]]
        self._starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as an int64 array (a copy; may span shards)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside {self.root} ({len(self)})")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self._starts[shard])
            piece = self.arrays[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each id occurs (for the unigram entropy baseline)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for arr in self.arrays:
            counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
        return counts


def open_shards(path: str | Path, expected_tokenizer_sha256: str | None = None,
                verify: bool = True) -> TokenStream:
    """Open a split's shards; with `verify`, every shard's sha256 is checked.

    Raises `DataError` for a missing or foreign manifest, a tokenizer other than the expected
    one, or a shard of the wrong size or hash.
    """
    root = Path(path)
    try:
        manifest = read_json(root / MANIFEST)
    except (OSError, ValueError):
        raise DataError(f"no readable {MANIFEST} in {root}; delete {root} and prepare the data "
                        "again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root} has shard format {manifest.get('format_version')}, expected "
                        f"{FORMAT_VERSION}; delete {root} to rebuild")
    found = manifest.get("tokenizer_sha256")
    if expected_tokenizer_sha256 is not None and found != expected_tokenizer_sha256:
        raise DataError(f"{root} was tokenized with another tokenizer (sha256 {str(found)[:12]}…, "
                        f"expected {expected_tokenizer_sha256[:12]}…); delete {root} to rebuild")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        file = root / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
            raise DataError(f"shard {file} is missing or truncated; delete {root} to rebuild")
        if verify and sha256_file(file) != shard["sha256"]:
            raise DataError(f"shard {file} is corrupted: sha256 mismatch; delete {root} to rebuild")
    return TokenStream(root, manifest)
