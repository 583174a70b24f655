"""nestlearn: Nested Learning in PyTorch.

Memories that learn in context (Titans), HOPE and its variants, deep optimizers and level
clocks, with the data, training and evaluation stack around them.
"""

__version__ = "0.1.0"
