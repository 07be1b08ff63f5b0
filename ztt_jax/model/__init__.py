"""The ZTT language model: `ZTTModel(cfg)` with `cfg` a `ModelConfig` (or its dict/ConfigDict form)."""
from ztt_jax.model.config import ModelConfig
from ztt_jax.model.lm import ZTTModel, count_params

__all__ = ["ModelConfig", "ZTTModel", "count_params"]
