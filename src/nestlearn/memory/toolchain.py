"""Whether the memories' compiled paths can run here. ``torch.compile`` needs a C++ compiler
on CPU (and builds nestlearn's C++ kernels with it) and triton on GPU; where they are missing, a
layer with its compile switch on falls back to torch's own ops, the same equations, slower,
and says so once in one line instead of failing."""

from __future__ import annotations

import functools
import sys

from nestlearn.memory import cpu_kernels
from nestlearn.utils.compiling import first_line

_warned: set[str] = set()


@functools.cache
def missing(device_type: str) -> str | None:
    """Why the compiled path cannot run on ``device_type``, or None if it can (checked once per
    process: on CPU by building the C++ kernels, which needs the same compiler as inductor)."""
    if device_type == "cpu":
        try:
            cpu_kernels.build("compile")
        except RuntimeError as exc:
            return f"no working C++ compiler with OpenMP ({first_line(exc.__cause__ or exc)})"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    return None


def compile_available(device_type: str, option: str, cost: str) -> bool:
    """True if ``option``'s compiled path can run on ``device_type``; else False, after one
    warning line (once per option and process) that names the switch and ``cost``."""
    reason = missing(device_type)
    if reason is None:
        return True
    if option not in _warned:
        _warned.add(option)
        print(f"nestlearn: warning: {option}=true but {reason}: running torch's own ops instead "
              f"({cost}); set {option}=false to silence this", file=sys.stderr)
    return False
