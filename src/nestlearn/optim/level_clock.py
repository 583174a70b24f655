"""Level clocks: the chunked multi-frequency update scheduler of the Continuum Memory System.

In a CMS, level l's parameters change once per chunk of C_l steps, by the error accumulated
over that chunk (Nested Learning, CMS equation):

    theta_l <- theta_l - eta_l * sum_{t in chunk} grad_t        (when the chunk is complete)

This is gradient accumulation with one optimizer per level:

* Steps are 0-indexed. Level l *fires* at step s when (s + 1) % C_l == 0, i.e. right after the
  backward pass of the C_l-th step of its chunk (steps 0..C-1 form the first chunk, so a level
  with C = 4 fires at steps 3, 7, 11, ...; after N steps it has fired N // C times).
* Gradients accumulate by PyTorch's own `+=` in `.grad`: a level's gradients are zeroed only
  right after it fires, so at firing time `.grad` holds the **sum** of its chunk's C_l
  gradients. Each level has its own optimizer over disjoint parameters, so the fast level's
  `zero_grad` never touches a slower level's accumulation.

How far a level moves depends on its learning rate and on the optimizer (`level_lr`; the
derivation is in docs/architecture.md, "Level clocks"). Over T steps a level fires T / C times.
With SGD a firing applies lr_l times the sum of C gradients: lr_l = base_lr (Eq. 71 with the
fast level's η) moves it as far per token as the fast level; the seed's lr_l = base_lr / C
("mean") applies the chunk's mean, one fast-sized step per firing, 1/C as far per token. Adam
divides by the gradient's scale, so a firing moves ~lr_l whatever was summed: "mean" then moves
a level 1/C² as far per token as the fast one (1/4096 at C = 64), and matching needs lr_l =
base_lr √C when gradients are noise-dominated (Adam's square-root rule for a C-times larger
batch: drift and diffusion per token both match) or base_lr C when they are identical.
Matching is not what trains best: in HOPE's study (docs/results.md) `mean`, the slowest-moving
rule, beat `flat`, `sqrt` and both levels every step, so it is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

LevelLrRule = Literal["mean", "flat", "sqrt", "linear"]


def level_lr(base_lr: float, chunk_size: int, rule: LevelLrRule) -> float:
    """The learning rate of a level that fires once per `chunk_size` steps with the sum of its
    chunk's gradients: base_lr times 1/C (`mean`, the seed's), 1 (`flat`), √C (`sqrt`) or C
    (`linear`); which one matches the fast level depends on the optimizer (module docstring)."""
    exponents = {"mean": -1.0, "flat": 0.0, "sqrt": 0.5, "linear": 1.0}
    if rule not in exponents:
        raise ValueError(f"unknown level lr rule {rule!r}; expected one of {', '.join(exponents)}")
    scale: float = math.pow(chunk_size, exponents[rule])
    return base_lr * scale


def _check_chunk_sizes(chunk_sizes: Mapping[str, int]) -> dict[str, int]:
    if not chunk_sizes:
        raise ValueError("chunk_sizes is empty: give at least one level, e.g. {'level1_fast': 1}")
    checked: dict[str, int] = {}
    for level, size in chunk_sizes.items():
        if not isinstance(level, str) or not level:
            raise ValueError(f"level names must be non-empty strings, got {level!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"chunk size of level {level!r} must be a positive int, got {size!r}")
        checked[level] = size
    return checked


class ChunkedUpdateScheduler:
    """Says which levels fire at each step and counts their firings (see the module docstring).

    `should_update` is a pure function of the step, so a resumed run fires exactly where an
    uninterrupted one would; the counters are bookkeeping, restored by `load_state_dict`.
    """

    def __init__(self, chunk_sizes: Mapping[str, int]) -> None:
        self.chunk_sizes = _check_chunk_sizes(chunk_sizes)
        self.update_counts: dict[str, int] = {}
        self.last_update_step: dict[str, int] = {}
        self.reset()

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.chunk_sizes)

    def _chunk(self, level: str) -> int:
        try:
            return self.chunk_sizes[level]
        except KeyError:
            raise ValueError(
                f"unknown level {level!r}; this scheduler has {', '.join(self.chunk_sizes)}"
            ) from None

    def should_update(self, level: str, step: int) -> bool:
        """True when `step` (0-indexed) completes a chunk of `level`: (step + 1) % C == 0."""
        chunk = self._chunk(level)
        if step < 0:
            raise ValueError(f"step must be >= 0 (steps are 0-indexed), got {step}")
        return (step + 1) % chunk == 0

    def levels_to_update(self, step: int) -> list[str]:
        """The levels that fire at `step`, fastest-declared first."""
        return [level for level in self.chunk_sizes if self.should_update(level, step)]

    def mark_updated(self, level: str, step: int) -> None:
        """Record that `level` applied its accumulated gradients at `step`."""
        self._chunk(level)
        self.update_counts[level] += 1
        self.last_update_step[level] = step

    def get_update_count(self, level: str) -> int:
        self._chunk(level)
        return self.update_counts[level]

    def get_stats(self, step: int) -> dict[str, dict[str, int]]:
        """Per level, after step `step` (0-indexed) is done: chunk_size, update_count,
        expected_updates ((step + 1) // C), last_update_step (-1: never), pending_steps
        (backward passes accumulated but not yet applied) and next_update (next firing step).
        """
        stats: dict[str, dict[str, int]] = {}
        for level, chunk in self.chunk_sizes.items():
            pending = (step + 1) % chunk
            stats[level] = {
                "chunk_size": chunk,
                "update_count": self.update_counts[level],
                "expected_updates": (step + 1) // chunk,
                "last_update_step": self.last_update_step[level],
                "pending_steps": pending,
                "next_update": step + chunk - pending,
            }
        return stats

    def reset(self) -> None:
        self.update_counts = dict.fromkeys(self.chunk_sizes, 0)
        self.last_update_step = dict.fromkeys(self.chunk_sizes, -1)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: chunk sizes (checked on load) and the counters."""
        return {
            "chunk_sizes": dict(self.chunk_sizes),
            "update_counts": dict(self.update_counts),
            "last_update_step": dict(self.last_update_step),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = dict(state["chunk_sizes"])
        if saved != self.chunk_sizes:
            raise ValueError(
                f"scheduler state has chunk sizes {saved}, but this scheduler has {self.chunk_sizes}"
            )
        self.update_counts = {level: int(state["update_counts"][level]) for level in saved}
        self.last_update_step = {level: int(state["last_update_step"][level]) for level in saved}

    def __repr__(self) -> str:
        return f"ChunkedUpdateScheduler({self.chunk_sizes})"


@runtime_checkable
class HasLevels(Protocol):
    """A model that declares its levels: name -> the parameters that level owns."""

    def levels(self) -> dict[str, list[nn.Parameter]]: ...


def level_parameters(model: nn.Module, level_names: list[str]) -> dict[str, list[nn.Parameter]]:
    """Parameters per level, from `model.levels()` or else from submodules named like the levels.

    Every trainable parameter must belong to exactly one level: a parameter in two levels would
    be stepped twice, and one in none would silently never train.
    """
    if isinstance(model, HasLevels):
        declared = model.levels()
    else:
        declared = {}
        for name in level_names:
            try:
                declared[name] = list(model.get_submodule(name).parameters())
            except AttributeError:
                raise ValueError(
                    f"model {type(model).__name__} has no levels() and no submodule {name!r}"
                ) from None
    unknown = sorted(set(level_names) - set(declared))
    undeclared = sorted(set(declared) - set(level_names))
    if unknown or undeclared:
        raise ValueError(
            f"levels do not match: chunk_sizes has {level_names}, the model has "
            f"{sorted(declared)} (missing in model: {unknown}, missing in chunk_sizes: {undeclared})"
        )
    owner: dict[int, str] = {}
    result: dict[str, list[nn.Parameter]] = {}
    for name in level_names:
        params = [p for p in declared[name] if p.requires_grad]
        if not params:
            raise ValueError(f"level {name!r} has no trainable parameters")
        for p in params:
            if id(p) in owner:
                raise ValueError(f"a parameter belongs to both {owner[id(p)]!r} and {name!r}")
            owner[id(p)] = name
        result[name] = params
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if orphans:
        raise ValueError(f"trainable parameters in no level would never update: {orphans[:5]}")
    return result


def setup_optimizers(
    model: nn.Module,
    chunk_sizes: Mapping[str, int],
    base_lr: float,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr_rule: LevelLrRule = "mean",
    **optimizer_kwargs: Any,
) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per level over that level's parameters, lr = `level_lr(base_lr, C, lr_rule)`.

    The default rule is the seed's `mean` (base_lr / C): for SGD the chunk's mean gradient; under
    Adam a slow level then moves 1/C² as far per token as the fast one, which trained HOPE best
    of the four rules (docs/results.md). Extra keywords go to `optimizer_cls`.
    """
    sizes = _check_chunk_sizes(chunk_sizes)
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    params = level_parameters(model, list(sizes))
    return {
        level: optimizer_cls(params[level], lr=level_lr(base_lr, sizes[level], lr_rule), **optimizer_kwargs)
        for level in sizes
    }


def apply_level_updates(
    optimizers: Mapping[str, torch.optim.Optimizer],
    scheduler: ChunkedUpdateScheduler,
    step: int,
) -> list[str]:
    """After the backward pass of `step`: step and zero the levels that fire; return them.

    Only the firing level's optimizer zeroes its gradients, so slower levels keep accumulating.
    """
    fired = scheduler.levels_to_update(step)
    for level in fired:
        optimizers[level].step()
        optimizers[level].zero_grad(set_to_none=True)
        scheduler.mark_updated(level, step)
    return fired
