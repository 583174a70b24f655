"""Language models behind one registry: `build(config.model)` returns a `LanguageModel`.

Importing this package imports every architecture module, which registers its builders.
"""

from nestlearn.models.base import LanguageModel
from nestlearn.models.registry import available, build, register
from nestlearn.models.transformer import KVCache, TransformerPP

__all__ = ["KVCache", "LanguageModel", "TransformerPP", "available", "build", "register"]
