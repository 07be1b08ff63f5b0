"""The ZTT language model: `ZTTModel(cfg)` with `cfg` a `ModelConfig` (or its dict/ConfigDict form),
and `ExitRule`, the early-exit rule its callers pass."""
from ztt_jax.model.config import ModelConfig
from ztt_jax.model.exit import ExitRule
from ztt_jax.model.lm import ZTTModel, count_params

__all__ = ["ExitRule", "ModelConfig", "ZTTModel", "count_params"]
