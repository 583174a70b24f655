"""The data stage: corpus → filter → tokenizer → shards, cached under a content fingerprint.

`<artifacts_dir>/data/<fingerprint>/<source>/<split>/` holds the shards of each source and split,
`stats.json` beside them. The fingerprint covers the data config and each source's identity,
so a changed config or corpus gets a new directory, and an unchanged one is reused after its
checksums pass. Invalid pieces (a corrupted shard, a foreign tokenizer) are rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nestlearn.config.schema import DataConfig
from nestlearn.data.corpus import SPLITS, Source, Split, open_source, unique_names
from nestlearn.data.errors import DataError
from nestlearn.data.filter import SplitStats, empty_stats, filtered_documents
from nestlearn.data.shards import FORMAT_VERSION, ShardWriter, TokenStream, open_shards
from nestlearn.data.tokenizer import (
    Tokenizer,
    load_tokenizer,
    reusable_tokenizer,
    train_tokenizer,
)
from nestlearn.utils.io import atomic_directory, atomic_write_json, read_json

Log = Callable[[str], None]
STATS_FILE = "stats.json"
_ENCODE_BATCH = 64


@dataclass(frozen=True)
class PreparedData:
    """Where a prepared corpus lives and what the loaders need to know about it."""

    root: Path
    tokenizer_path: Path
    vocab_size: int
    tokenizer_sha256: str
    source_names: list[str]  # stable names, one per cfg.sources entry
    weights: list[float]  # normalised mixture weights
    stats: dict[str, Any]  # stats.json content

    def shard_dir(self, source_index: int, split: str) -> Path:
        return self.root / self.source_names[source_index] / split


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer_fingerprint(cfg: DataConfig, sources: list[Source]) -> str:
    """What the trained tokenizer depends on: not the weights, shard size or output places."""
    tok = dataclasses.asdict(cfg.tokenizer)
    del tok["name"], tok["path"]
    return _digest({
        "sources": [s.identity() for s in sources], "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction, "max_docs": cfg.max_docs,
        "max_chars_per_source": cfg.max_chars_per_source,
        "filter": dataclasses.asdict(cfg.filter), "tokenizer": tok,
    })


def _data_fingerprint(cfg: DataConfig, sources: list[Source]) -> str:
    settings = dataclasses.asdict(cfg)
    del settings["artifacts_dir"]
    return _digest({"config": settings, "sources": [s.identity() for s in sources],
                    "format_version": FORMAT_VERSION})


def _normalised_weights(cfg: DataConfig) -> list[float]:
    weights = cfg.weights or [1.0] * len(cfg.sources)
    total = float(sum(weights))
    return [w / total for w in weights]


def _check_splits(source: Source, stats: dict[Split, SplitStats], val_fraction: float) -> None:
    """An empty split would only fail later, in training or evaluation: fail now, clearly."""
    train, val = stats["train"], stats["val"]
    if train.documents_kept + val.documents_kept == 0:
        dropped = dict(train.dropped + val.dropped)
        raise DataError(f"source '{source.spec}' has no documents after filtering "
                        f"(seen {train.documents_seen + val.documents_seen}, dropped {dropped}); "
                        "check the path or relax data.filter")
    for split, st in stats.items():
        if st.documents_kept == 0:
            raise DataError(f"source '{source.spec}' has no {split} documents after the "
                            f"{val_fraction:g} val split ({train.documents_kept + val.documents_kept}"
                            " kept in all); add documents (a split is by file/record) or change "
                            "data.val_fraction")


def _documents(source: Source, cfg: DataConfig, stats: dict[Split, SplitStats],
               progress: bool, what: str) -> Iterator[tuple[Split, str]]:
    bar = tqdm(filtered_documents(source, cfg, stats), desc=f"{what} {source.name}",
               unit="doc", disable=not progress or not sys.stderr.isatty(), leave=False)  # no \r in logs
    for split, doc in bar:
        yield split, doc.text
    _check_splits(source, stats, cfg.val_fraction)


def _train_texts(sources: list[Source], cfg: DataConfig, progress: bool) -> Iterator[str]:
    for source in sources:
        stats = empty_stats()
        for split, text in _documents(source, cfg, stats, progress, "tokenizer: reading"):
            if split == "train":
                yield text


def _tokenizer(cfg: DataConfig, sources: list[Source], progress: bool, log: Log) -> Tokenizer:
    """Load `tokenizer.path`, reuse a valid trained one, or train one on the training split."""
    tcfg = cfg.tokenizer
    if tcfg.path is not None:
        return load_tokenizer(tcfg.path)
    fingerprint = _tokenizer_fingerprint(cfg, sources)
    name = (f"{tcfg.model_type}{tcfg.vocab_size}-{fingerprint[:12]}" if tcfg.name == "auto"
            else tcfg.name)
    out_dir = Path(cfg.artifacts_dir) / "tokenizer" / name
    if reusable_tokenizer(out_dir, {"fingerprint": fingerprint}):
        log(f"data: reusing tokenizer {out_dir}")
        return load_tokenizer(out_dir)
    log(f"data: training a {tcfg.model_type} tokenizer ({tcfg.vocab_size} pieces) in {out_dir}")
    start = time.perf_counter()
    path = train_tokenizer(_train_texts(sources, cfg, progress), tcfg, out_dir,
                           meta={"fingerprint": fingerprint})
    tok = load_tokenizer(path)
    log(f"data: tokenizer ready ({tok.vocab_size} pieces, {time.perf_counter() - start:.1f}s)")
    return tok


def _valid_source(out_dir: Path, tokenizer: Tokenizer, log: Log) -> bool:
    try:
        for split in SPLITS:
            open_shards(out_dir / split, tokenizer.sha256, verify=True)
    except DataError as exc:
        if (out_dir / SPLITS[0]).exists() or (out_dir / SPLITS[1]).exists():
            log(f"data: rebuilding {out_dir.name}: {exc}")
        return False
    return True


def _build_source(source: Source, cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path,
                  progress: bool) -> None:
    """One pass over the source writes both splits, each directory replaced atomically."""
    stats = empty_stats()
    with ExitStack() as stack:
        writers = {s: ShardWriter(stack.enter_context(atomic_directory(out_dir / s)),
                                  vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                                  shard_tokens=cfg.shard_tokens) for s in SPLITS}
        pending: list[tuple[Split, str]] = []
        for item in _documents(source, cfg, stats, progress, "data: tokenizing"):
            pending.append(item)
            if len(pending) == _ENCODE_BATCH:
                _encode_into(pending, tokenizer, writers)
                pending = []
        _encode_into(pending, tokenizer, writers)
        for split, writer in writers.items():
            st = stats[split]
            st.tokens = writer.tokens
            writer.finish(tokenizer.sha256, {"source": source.spec, "split": split,
                                             "characters": st.characters, "bytes": st.bytes,
                                             "stats": st.to_dict()})


def _encode_into(items: list[tuple[Split, str]], tokenizer: Tokenizer,
                 writers: dict[Split, ShardWriter]) -> None:
    for (split, _), ids in zip(items, tokenizer.encode_batch([t for _, t in items]), strict=True):
        writers[split].add(ids)


def _entropy_nats(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def _stats(fingerprint: str, tokenizer: Tokenizer, sources: list[Source], weights: list[float],
           streams: list[dict[Split, TokenStream]]) -> dict[str, Any]:
    """stats.json: per source and split counts, and the baselines a model is compared with.

    `sources[name][split]` holds the counts; `source_info[name]` the spec, weight and entropy.
    `unigram_entropy_nats` is the entropy of the mixture (by weight) of the sources' training
    unigram distributions: the loss of the best context-free predictor of training batches.
    `bytes_per_token` pools all sources of a split; eos separators count as tokens.
    """
    per_source: dict[str, Any] = {}
    info: dict[str, Any] = {}
    mixture = np.zeros(tokenizer.vocab_size, dtype=np.float64)
    for source, weight, split_streams in zip(sources, weights, streams, strict=True):
        counts = split_streams["train"].token_counts(tokenizer.vocab_size)
        probs = counts / max(1, int(counts.sum()))
        mixture += weight * probs
        per_source[source.name] = {split: stream.manifest["stats"]
                                   for split, stream in split_streams.items()}
        info[source.name] = {"spec": source.spec, "weight": weight,
                             "unigram_entropy_nats": _entropy_nats(probs)}
    totals = {split: {key: sum(s[split][key] for s in per_source.values())
                      for key in ("documents_kept", "characters", "bytes", "tokens")}
              for split in SPLITS}
    return {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
        "sources": per_source, "source_info": info, "totals": totals,
        "unigram_entropy_nats": _entropy_nats(mixture),
        "bytes_per_token": {split: totals[split]["bytes"] / totals[split]["tokens"]
                            for split in SPLITS},
    }


def _write_if_changed(path: Path, obj: dict[str, Any]) -> None:
    """Rewrite only on change, so an unchanged preparation leaves every file untouched."""
    try:
        if read_json(path) == json.loads(json.dumps(obj)):
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, obj)


def prepare_data(cfg: DataConfig, *, progress: bool = True, log: Log = print) -> PreparedData:
    """Prepare (or reuse) the tokenizer and the shards of every source and split of `cfg`."""
    start = time.perf_counter()
    names = unique_names(cfg.sources)
    sources = [open_source(spec, text_field=cfg.text_field, name=name)
               for spec, name in zip(cfg.sources, names, strict=True)]
    fingerprint = _data_fingerprint(cfg, sources)
    root = Path(cfg.artifacts_dir) / "data" / fingerprint[:16]
    tokenizer = _tokenizer(cfg, sources, progress, log)
    streams: list[dict[Split, TokenStream]] = []
    for source in sources:
        out_dir = root / source.name
        if _valid_source(out_dir, tokenizer, log):
            log(f"data: reusing shards of {source.name} in {out_dir}")
        else:
            log(f"data: writing shards of {source.name} in {out_dir}")
            _build_source(source, cfg, tokenizer, out_dir, progress)
        streams.append({s: open_shards(out_dir / s, tokenizer.sha256, verify=False)
                        for s in SPLITS})
    weights = _normalised_weights(cfg)
    stats = _stats(fingerprint, tokenizer, sources, weights, streams)
    _write_if_changed(root / STATS_FILE, stats)
    log(f"data: ready in {root} ({stats['totals']['train']['tokens']:,} train tokens, "
        f"{time.perf_counter() - start:.1f}s)")
    return PreparedData(root=root, tokenizer_path=tokenizer.path, vocab_size=tokenizer.vocab_size,
                        tokenizer_sha256=tokenizer.sha256, source_names=names, weights=weights,
                        stats=stats)
