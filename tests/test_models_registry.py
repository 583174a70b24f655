"""The model registry: lookup, aliases, and errors that say what to fix."""

from __future__ import annotations

import pytest

from nestlearn.config import ModelConfig
from nestlearn.models import LanguageModel, TransformerPP, available, build, register


def test_transformer_is_registered_with_alias() -> None:
    assert {"transformer", "transformer++"} <= set(available())
    assert available() == sorted(available())
    for name in ("transformer", "transformer++"):
        model = build(ModelConfig(type=name, vocab_size=32, d_model=16, n_heads=2, n_layers=1))
        assert isinstance(model, TransformerPP)


def test_missing_vocab_size_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.vocab_size") as info:
        build(ModelConfig())
    assert "\n" not in str(info.value)


def test_unknown_type_lists_available_and_suggests() -> None:
    with pytest.raises(ValueError, match="transfomer") as info:
        build(ModelConfig(type="transfomer", vocab_size=32))
    message = str(info.value)
    assert "did you mean 'transformer'" in message
    assert all(name in message for name in available())


def test_unknown_type_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ValueError, match="available") as info:
        build(ModelConfig(type="zzzz", vocab_size=32))
    assert "did you mean" not in str(info.value)


def test_invalid_config_is_rejected_before_building() -> None:
    with pytest.raises(ValueError, match=r"model\.n_heads"):
        build(ModelConfig(vocab_size=32, d_model=30, n_heads=4))


def test_register_rejects_a_second_builder_for_a_name() -> None:
    def other(cfg: ModelConfig) -> LanguageModel:
        return TransformerPP(cfg)

    with pytest.raises(ValueError, match="already registered"):
        register("transformer")(other)
