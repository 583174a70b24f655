"""Name → builder registry, so `model.type` in a config picks an architecture.

Each architecture module registers its builder at import time with `@register("name")`;
`nestlearn.models` imports them all, so `build` sees every built-in type.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from nestlearn.config.schema import ModelConfig
from nestlearn.models.base import LanguageModel

Builder = Callable[[ModelConfig], LanguageModel]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[B], B]:
    """Decorator registering a builder `(ModelConfig) -> LanguageModel` under `name`."""

    def decorate(builder: B) -> B:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"model type '{name}' is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorate


def available() -> list[str]:
    """The registered model types, sorted."""
    return sorted(_BUILDERS)


def build(cfg: ModelConfig) -> LanguageModel:
    """Validate `cfg` and build the model its `type` names."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is not set: set it, or let the tokenizer fill it in")
    cfg.check("model")
    check_type(cfg.type)
    return _BUILDERS[cfg.type](cfg)


def check_type(name: str) -> None:
    """A one-line error for a ``model.type`` nothing is registered under (the CLI checks it
    before preparing data)."""
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model.type '{name}'; available: {', '.join(available())}{hint}")
