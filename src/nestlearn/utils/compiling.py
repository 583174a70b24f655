"""``torch.compile`` of the memories' steps (chunks, convolution): a failure to compile is one line
naming the option."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def call_compiled(option: str, step: Callable[..., T], *args: object) -> T:
    """``step(*args)`` for a compiled ``step``; a compiler failure (no C++ compiler, no triton)
    becomes a ``RuntimeError`` of one line that tells the user which config switch to turn off
    (``option``, e.g. ``model.self_ref.compile``), instead of inductor's page of log."""
    try:
        return step(*args)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        raise RuntimeError(f"{option}=true: torch.compile failed ({first_line(exc.inner_exception)}); "
                           f"set {option}=false, or install what torch.compile needs (a C++ compiler "
                           "on CPU, triton on GPU)") from exc


def first_line(exc: BaseException | None) -> str:
    """``Type: first line of the message`` (at most 200 characters): the cause in a one-line
    error, instead of a compiler's page of log."""
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:200]}"


class _ExpectedFallbacks(logging.Filter):
    """Drops inductor's warning that an op without a C shim (``linalg_solve_triangular``) runs
    through its proxy executor under ``cpp_wrapper``: expected for the chunk step's triangular
    solves on CPU, printed per compiled graph, and nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is missing a c-shim implementation" not in record.getMessage()


def quiet_expected_fallbacks() -> None:
    """Install ``_ExpectedFallbacks`` on inductor's IR logger (once)."""
    logger = logging.getLogger("torch._inductor.ir")
    if not any(isinstance(f, _ExpectedFallbacks) for f in logger.filters):
        logger.addFilter(_ExpectedFallbacks())

