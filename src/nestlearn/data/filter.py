"""Document filters (length, exact and near duplicates, language) and the counts they leave.

Every dropped document is counted under a reason, so `stats.json` explains how much of a
corpus was used. Filtering and the per-source caps run in one streaming pass, in source order.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nestlearn.config.schema import DataConfig, FilterConfig
from nestlearn.data.corpus import SPLITS, Document, Source, Split, split_of
from nestlearn.data.errors import DataError

_WORD = re.compile(r"\w+")
_MERSENNE = (1 << 61) - 1


@dataclass
class SplitStats:
    """Counts of one (source, split); `tokens` is filled in after tokenisation."""

    documents_seen: int = 0
    documents_kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    characters: int = 0
    bytes: int = 0
    tokens: int = 0

    def drop(self, reason: str) -> None:
        self.documents_seen += 1
        self.dropped[reason] += 1

    def keep(self, text: str) -> None:
        self.documents_seen += 1
        self.documents_kept += 1
        self.characters += len(text)
        self.bytes += len(text.encode("utf-8"))

    def to_dict(self) -> dict[str, Any]:
        return {"documents_seen": self.documents_seen, "documents_kept": self.documents_kept,
                "dropped": dict(sorted(self.dropped.items())), "characters": self.characters,
                "bytes": self.bytes, "tokens": self.tokens}


def empty_stats() -> dict[Split, SplitStats]:
    return {split: SplitStats() for split in SPLITS}


class MinHashIndex:
    """Near-duplicate detection: MinHash signatures of word shingles, bucketed by LSH bands.

    A document is a near duplicate when the estimated Jaccard similarity of its shingle set to
    an earlier document sharing a band is >= threshold. Hashes are seeded constants, so the
    outcome is the same in every process.
    """

    def __init__(self, threshold: float, num_perm: int = 128, bands: int = 32, shingle: int = 5):
        self.threshold, self.bands, self.shingle = threshold, bands, shingle
        rng = np.random.default_rng(20240601)
        # a, b < 2^31 and x < 2^32 keep a*x + b below 2^64: no overflow before the modulus.
        self._a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = _WORD.findall(text)
        n = max(1, len(words) - self.shingle + 1)
        shingles = {" ".join(words[i:i + self.shingle]) for i in range(n)}
        base = np.array([zlib.crc32(s.encode("utf-8")) for s in shingles], dtype=np.uint64)
        signature = np.full(len(self._a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for block in np.array_split(base, max(1, len(base) // 4096)):  # bounded memory
            mixed = (self._a * block[:, None] + self._b) % np.uint64(_MERSENNE)
            np.minimum(signature, mixed.min(axis=0), out=signature)
        return signature

    def add_if_new(self, text: str) -> bool:
        """Index `text` and return True, or return False if it nearly duplicates an earlier one."""
        sig = self.signature(text)
        keys = [band.tobytes() for band in np.array_split(sig, self.bands)]
        for bucket, key in zip(self._buckets, keys, strict=True):
            for other in bucket.get(key, ()):
                if float(np.mean(self._signatures[other] == sig)) >= self.threshold:
                    return False
        index = len(self._signatures)
        self._signatures.append(sig)
        for bucket, key in zip(self._buckets, keys, strict=True):
            bucket.setdefault(key, []).append(index)
        return True


class DocumentFilter:
    """Applies the configured filters in a fixed order; stateful (remembers what it has kept)."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._hashes: set[bytes] = set()
        self._near = MinHashIndex(cfg.near_dedup_threshold) if cfg.near_dedup else None
        self._detect = _language_detector() if cfg.language else None

    def reason_to_drop(self, text: str) -> str | None:
        """The reason `text` is dropped, or None to keep it (a kept text is remembered)."""
        if len(text) < self.cfg.min_chars:
            return "too_short"
        if len(text) > self.cfg.max_chars:
            return "too_long"
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if self.cfg.dedup and digest in self._hashes:
            return "duplicate"
        if self._detect is not None and self._detect(text) != self.cfg.language:
            return "language"
        if self._near is not None and not self._near.add_if_new(text):
            return "near_duplicate"
        self._hashes.add(digest)
        return None


def _language_detector() -> Any:
    try:
        import langdetect
    except ImportError:
        raise DataError("data.filter.language needs the optional `langdetect` package; "
                        "install it (`pip install langdetect`) or set data.filter.language=null"
                        ) from None
    langdetect.DetectorFactory.seed = 0  # langdetect is randomised; fix it for reproducibility

    def detect(text: str) -> str:
        try:
            return str(langdetect.detect(text[:5000]))
        except langdetect.LangDetectException:
            return "unknown"

    return detect


class _Caps:
    """`max_docs` / `max_chars_per_source` per source, shared by the splits in proportion."""

    def __init__(self, cfg: DataConfig) -> None:
        def share(cap: int | None) -> dict[Split, float]:
            if cap is None:
                return {"train": math.inf, "val": math.inf}
            val = max(1, math.ceil(cap * cfg.val_fraction))
            return {"train": cap - val, "val": val}

        self.docs, self.chars = share(cfg.max_docs), share(cfg.max_chars_per_source)
        self.used_docs: Counter[str] = Counter()
        self.used_chars: Counter[str] = Counter()

    def full(self, split: Split) -> bool:
        return (self.used_docs[split] >= self.docs[split]
                or self.used_chars[split] >= self.chars[split])

    def add(self, split: Split, text: str) -> None:
        self.used_docs[split] += 1
        self.used_chars[split] += len(text)


def filtered_documents(source: Source, cfg: DataConfig,
                       stats: dict[Split, SplitStats]) -> Iterator[tuple[Split, Document]]:
    """Kept documents of `source` with their split, counting every decision in `stats`.

    With caps, reading stops once the training share is full and val holds at least one
    document, so both splits come from the same leading part of the source (in its read order).
    A document whose split is already full is not counted as seen.
    """
    doc_filter = DocumentFilter(cfg.filter)
    caps = _Caps(cfg)

    def on_skip(doc_id: str, reason: str) -> None:
        stats[split_of(doc_id, cfg.val_fraction)].drop(reason)

    for doc in source.documents(on_skip):
        if caps.full("train") and (caps.used_docs["val"] > 0 or caps.full("val")):
            return
        split = split_of(doc.doc_id, cfg.val_fraction)
        if caps.full(split):
            continue
        reason = doc_filter.reason_to_drop(doc.text)
        if reason is not None:
            stats[split].drop(reason)
            continue
        stats[split].keep(doc.text)
        caps.add(split, doc.text)
        yield split, doc
