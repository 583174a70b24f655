"""nestlearn: Nested Learning in PyTorch.

Memories that learn in context (Titans), HOPE and its variants, deep optimizers and level
clocks, with the data, training and evaluation stack around them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`nestlearn.load` without importing torch for `import nestlearn` (the CLI's start-up)."""
    if name == "load":
        from nestlearn.loading import load

        return load
    raise AttributeError(f"module 'nestlearn' has no attribute {name!r}")
