"""Typed configs: the schema (``schema``), loading and overrides (``loader``), cross-field rules
(``validate``), migration of configs written by earlier versions (``migrate``), and presets
(``presets/<name>.py``, each with ``get_config()``)."""

from moela.configs.loader import apply_overrides, load, load_json, save_json
from moela.configs.schema import (
    AttentionConfig,
    Config,
    DataConfig,
    LayerContext,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    RuntimeConfig,
    ServeConfig,
    TrainConfig,
)
from moela.configs.validate import ConfigError, validate

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LayerContext",
    "MeshConfig",
    "ModelConfig",
    "MoEConfig",
    "RopeConfig",
    "RuntimeConfig",
    "ServeConfig",
    "TrainConfig",
    "apply_overrides",
    "load",
    "load_json",
    "save_json",
    "validate",
]
