"""`NestlearnConfig`: a transformers config that carries a nestlearn `ModelConfig`.

The nestlearn config is stored whole, as the nested dict `nestlearn` (every field written out,
so a saved model does not change if nestlearn's defaults do); the fields transformers reads
itself (`vocab_size`, `tie_word_embeddings`) are derived from it, never set apart from it.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from nestlearn.config.errors import ConfigError
from nestlearn.config.loader import build, to_dict
from nestlearn.config.schema import ModelConfig


class NestlearnConfig(PreTrainedConfig):  # type: ignore[no-untyped-call]
    """``nestlearn``: `ModelConfig` as a dict (`NestlearnConfig.from_model_config` builds one from
    the dataclass); ``eos_token_id``: the tokenizer's end of sequence (nestlearn's is 1); no
    BOS or padding token exists."""

    model_type = "nestlearn"

    nestlearn: dict[str, Any] | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    eos_token_id: int | None = 1
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if not isinstance(self.nestlearn, dict | None):
            raise ConfigError("nestlearn", self.nestlearn, "a dict of nestlearn's ModelConfig "
                              "(NestlearnConfig.from_model_config builds one from the dataclass)")
        model = build(ModelConfig, dict(self.nestlearn or {}), {}, prefix="nestlearn.")
        if model.vocab_size is None:
            model.vocab_size = self.vocab_size
        for name, value, own in (("vocab_size", self.vocab_size, model.vocab_size),
                                 ("tie_word_embeddings", self.tie_word_embeddings, model.tie_embeddings)):
            if value is not None and value != own:
                raise ConfigError(name, value, f"{own!r}, the value of the nestlearn model config")
        model.check("nestlearn")
        self.nestlearn = to_dict(model)
        self.vocab_size = model.vocab_size
        self.tie_word_embeddings = model.tie_embeddings
        super().__post_init__(**kwargs)  # type: ignore[no-untyped-call]

    @classmethod
    def from_model_config(cls, model: ModelConfig, **kwargs: Any) -> NestlearnConfig:
        """The config of a model built from `model`; ``kwargs`` set the other fields."""
        return cls(nestlearn=to_dict(model), **kwargs)

    @property
    def model_config(self) -> ModelConfig:
        """The nestlearn `ModelConfig` (a fresh copy: editing it does not change this config)."""
        return build(ModelConfig, dict(self.nestlearn or {}), {})
