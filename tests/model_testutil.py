"""Small shared helpers for the model tests: tiny configs, randomized params, jitted apply."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax.model import ExitRule, ModelConfig, ZTTModel

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, n_head_layers=1, n_middle_layers=2,
            n_tail_layers=1, num_cycles=3, max_seq_len=16, zero_key_init_std=1.0)


def tiny_cfg(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw}).validate()


def init_params(cfg, B=2, T=6, seed=0):
  """Random unboxed params with the model's tree, drawn in numpy.

  jit(model.init) costs seconds of threefry compilation on CPU; the tests only need the tree
  (jax.eval_shape) and values in which no term is trivially 1 or 0.
  """
  model = ZTTModel(cfg)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    noise = rng.normal(size=a.shape)
    if name == "scale":
      x = 1.0 + 0.1 * noise
    elif "zero_key" in name:
      x = 1.0 * noise
    elif name.endswith("bias"):
      x = 0.1 * noise
    elif name in ("embedding", "pos_embedding"):
      x = 0.5 * noise
    else:
      x = 0.25 * noise
    return jnp.asarray(x, a.dtype)

  return model, jax.tree_util.tree_map_with_path(draw, abstract)


def tokens(cfg, B=2, T=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)), jnp.int32)


@functools.lru_cache(maxsize=None)
def jitted_apply(model, num_cycles=None, **rule_fields):
  """jit of model.apply with the exit rule ExitRule.from_config(cfg, **rule_fields) baked in; its
  threshold stays a traced argument (None: no exit)."""
  rule_fields = dict(rule_fields)

  def f(params, toks, exit_threshold=None):
    rule = ExitRule.from_config(model.cfg, threshold=exit_threshold, **rule_fields)
    return model.apply({"params": params}, toks, rule, num_cycles)

  return jax.jit(f)


def apply(model, params, toks, exit_threshold=None, **static):
  return jitted_apply(model, **static)(params, toks, exit_threshold)
