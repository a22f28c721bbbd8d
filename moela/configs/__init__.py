"""Typed configs: the schema (``configs.schema``), loading and overrides (``configs.loader``),
cross-field rules (``configs.validate``), and presets (``configs/<name>.py``, each with
``get_config()``)."""

from moela.configs.loader import ConfigError, apply_overrides, load, load_json, save_json
from moela.configs.schema import (
    AttentionConfig,
    Config,
    DataConfig,
    LayerContext,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    ServeConfig,
    TrainConfig,
)
from moela.configs.validate import validate

__all__ = [
    "AttentionConfig", "Config", "ConfigError", "DataConfig", "LayerContext", "MeshConfig", "ModelConfig",
    "MoEConfig", "RopeConfig", "ServeConfig", "TrainConfig", "apply_overrides", "load", "load_json",
    "save_json", "validate",
]
