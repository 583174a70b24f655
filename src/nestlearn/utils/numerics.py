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
