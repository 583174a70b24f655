"""Inner-loop statistics of a model's state, for the Trainer's metrics.

Every Titans memory (and every self-referential Titans layer, for its M_memory) returns its
mean inner learning rate, momentum decay, forget rate and surprise norm with its state; this finds them wherever a model keeps them (any nesting of
dataclasses and tuples) and averages them, so users see the inner loops work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from nestlearn.memory import MemoryStats


def _memory_stats(obj: Any) -> Iterator[dict[str, float]]:
    if isinstance(obj, MemoryStats):
        yield obj.as_dict()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _memory_stats(getattr(obj, f.name))
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _memory_stats(item)


def inner_loop_stats(state: Any) -> dict[str, float]:
    """`memory/<name>` means over every memory layer in `state`; {} for a model without one."""
    found = list(_memory_stats(state))
    if not found:
        return {}
    return {f"memory/{key}": sum(d[key] for d in found) / len(found) for key in found[0]}
