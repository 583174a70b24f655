"""Language models behind one registry: `build(config.model)` returns a `LanguageModel`.

Importing this package imports every architecture module, which registers its builders.
"""

from nestlearn.models import hope as hope  # registers hope_attention, hope_attn_titans
from nestlearn.models import titans as titans  # registers titans_mac/_mag/_mal/_lmm
from nestlearn.models.base import LanguageModel
from nestlearn.models.registry import available, build, register
from nestlearn.models.transformer import KVCache, TransformerPP

__all__ = ["KVCache", "LanguageModel", "TransformerPP", "available", "build", "register"]
