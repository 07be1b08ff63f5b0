"""Small shared helpers for the model tests: tiny configs, randomized params, jitted apply."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax.model import ModelConfig, ZTTModel

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, n_head_layers=1, n_middle_layers=2,
            n_tail_layers=1, num_cycles=3, max_seq_len=16, zero_key_init_std=1.0)


def tiny_cfg(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw}).validate()


def init_params(cfg, B=2, T=6, seed=0, noise=0.1):
  """Unboxed params; norms, biases and all kernels get noise so no term is trivially 1 or 0."""
  model = ZTTModel(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((B, T), jnp.int32))["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


def tokens(cfg, B=2, T=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)), jnp.int32)


@functools.lru_cache(maxsize=None)
def jitted_apply(model, **static):
  """jit of model.apply with the static kwargs baked in; exit_threshold stays a traced argument."""
  static = dict(static)

  def f(params, toks, exit_threshold=None):
    return model.apply({"params": params}, toks, exit_threshold=exit_threshold, **static)

  return jax.jit(f)


def apply(model, params, toks, exit_threshold=None, **static):
  return jitted_apply(model, **static)(params, toks, exit_threshold)
