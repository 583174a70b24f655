"""Process-wide floating-point settings that the inner loops need to run at full speed on CPU."""

from __future__ import annotations

import torch


def flush_subnormals() -> bool:
    """Flush subnormal floats to zero (FTZ/DAZ) on CPU; returns whether the CPU supports it.

    Why: the in-context memories multiply by momentum and forget-gate decays over every chunk
    (β^C ≈ 5e-20 at β = 0.5, C = 64), so gradients flowing back through a few chunks fall below
    float32's smallest normal number (1.2e-38). x86 handles those on a microcode slow path: the
    self-referential Titans layer measured 1.9× slower forward + backward at 1 thread, and its
    per-token cost grew with sequence length. Values that small are below the rounding error of
    every term they are added to, so flushing them does not change results beyond that.

    The mode is per thread and a new thread inherits it from its creator: call this before the
    first parallel torch op of the process (the intra-op thread pool starts then). Threads that
    already exist keep denormals. ``pipeline.train`` calls it first (``train.flush_subnormals``),
    and so the CLI's training commands; scripts that use the layers directly should call it first.
    """
    return bool(torch.set_flush_denormal(True))


def finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with non-finite entries set to 0: what an in-context memory is given to learn from.

    Why: a memory's state outlives the call that wrote it (streaming, decoding, continual use),
    so one inf/NaN input would poison every later read. A zeroed entry writes a finite update
    (for a token, a blank one), so the state stays finite; the bad token's own output stays
    whatever its residual stream makes of it.
    """
    return torch.where(torch.isfinite(t), t, t.new_zeros(()))


def finite_rows_or_zero(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with every row (index of dim 0, e.g. a sequence of the batch) in which any of
    them holds a non-finite entry set to zeros in all of them, without a host sync: one update
    made of several tensors, such as a CMS level's in-context gradient, is dropped whole for
    that row rather than half-applied."""
    ok = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in ts]).all(0)
    return tuple(torch.where(ok.view(-1, *[1] * (t.dim() - 1)), t, t.new_zeros(())) for t in ts)
