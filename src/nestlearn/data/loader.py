"""Batches for training and evaluation, drawn from the prepared shards.

Training batches are random windows from a weighted mixture of sources. Batch number p uses an
RNG seeded by (seed, p) alone, so the state to save is two integers and a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nestlearn.data.errors import DataError
from nestlearn.data.prepare import PreparedData
from nestlearn.data.shards import TokenStream, open_shards

Batch = tuple[torch.Tensor, torch.Tensor]


def _open_split(prepared: PreparedData, split: str) -> list[TokenStream]:
    """The split of every source; verified by `prepare_data`, so only sizes are checked here."""
    if split not in ("train", "val"):
        raise DataError(f"unknown split '{split}'; expected 'train' or 'val'")
    return [open_shards(prepared.shard_dir(i, split), prepared.tokenizer_sha256, verify=False)
            for i in range(len(prepared.source_names))]


def _to_batch(windows: list[np.ndarray]) -> Batch:
    data = torch.from_numpy(np.stack(windows))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class BatchLoader:
    """Endless (x, y) int64 batches of shape (batch_size, seq_len), y = x shifted by one."""

    def __init__(self, prepared: PreparedData, split: str = "train", batch_size: int = 8,
                 seq_len: int = 128, seed: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
        self.batch_size, self.seq_len, self.seed, self.position = batch_size, seq_len, seed, 0
        self.streams = _open_split(prepared, split)
        self.weights = np.asarray(prepared.weights, dtype=np.float64)
        for name, stream, weight in zip(prepared.source_names, self.streams, self.weights,
                                        strict=True):
            if weight > 0 and len(stream) < seq_len + 1:
                raise DataError(f"source '{name}' has {len(stream)} {split} tokens, fewer than "
                                f"seq_len + 1 = {seq_len + 1}; add data or lower train.seq_len")

    def next_batch(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.position])
        choices = rng.choice(len(self.streams), size=self.batch_size, p=self.weights)
        windows = []
        for source in choices:
            stream = self.streams[source]
            start = int(rng.integers(0, len(stream) - self.seq_len))
            windows.append(stream.read(start, self.seq_len + 1))
        self.position += 1
        return _to_batch(windows)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


def _eval_windows(streams: list[TokenStream], seq_len: int, wanted: int) -> list[tuple[int, int]]:
    """(source, start) of up to `wanted` disjoint windows, shared round-robin by the sources
    and spread evenly over each source's split, interleaved across sources."""
    available = [(len(s) - 1) // seq_len for s in streams]
    taken = [0] * len(streams)
    while sum(taken) < wanted and taken != available:
        for i in range(len(streams)):
            if taken[i] < available[i] and sum(taken) < wanted:
                taken[i] += 1
    starts = [np.linspace(0, available[i] - 1, taken[i]).round().astype(int) * seq_len
              for i in range(len(streams))]
    order: list[tuple[int, int]] = []
    for k in range(max(taken, default=0)):
        order.extend((i, int(starts[i][k])) for i in range(len(streams)) if k < taken[i])
    return order


def iter_eval_batches(prepared: PreparedData, split: str = "val", batch_size: int = 8,
                      seq_len: int = 128, max_batches: int = 8) -> Iterator[Batch]:
    """Deterministic evaluation batches of disjoint windows (the last batch may be smaller).

    Checked eagerly: a split too short for one window raises `DataError` here, not mid-run.
    """
    streams = _open_split(prepared, split)
    windows = _eval_windows(streams, seq_len, batch_size * max_batches)
    if not windows:
        raise DataError(f"the {split} split of {prepared.root} has no window of seq_len + 1 = "
                        f"{seq_len + 1} tokens; lower seq_len or add {split} data")

    def batches() -> Iterator[Batch]:
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            yield _to_batch([streams[i].read(start, seq_len + 1) for i, start in chunk])

    return batches()
