"""Typed run configuration: dataclasses, YAML loading, overrides and validation."""

from nestlearn.config.errors import ConfigError
from nestlearn.config.loader import (
    available_configs,
    find_config,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from nestlearn.config.schema import (
    DataConfig,
    FilterConfig,
    LoggingConfig,
    ModelConfig,
    NestedOptimizerConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "FilterConfig",
    "LoggingConfig",
    "ModelConfig",
    "NestedOptimizerConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "available_configs",
    "find_config",
    "from_dict",
    "load_config",
    "parse_override",
    "to_dict",
]
