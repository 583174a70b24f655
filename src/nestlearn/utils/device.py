"""Where tensors live and at what precision: the device and autocast helpers every entry point
shares (training, evaluation, loading, export), kept apart from the trainer and the evaluations
so that none of them imports the other for it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device on a
    machine without CUDA is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} (train.device or --device) needs CUDA, and none is available; "
                           "use cpu or auto")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """bf16 autocast when asked for; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
