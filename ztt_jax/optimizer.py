"""AdamW with warmup + cosine decay, global-norm clipping, and a weight-decay mask."""
from __future__ import annotations

import jax
import optax

from ztt_jax.config import TrainConfig

# The zero-key pool sets how much attention each cycle gives up; decaying it towards 0 would push
# a0 towards a fixed value instead of letting the model learn when to stop.


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
  """True where weight decay applies: matrices and embeddings, not norms, biases or the pool."""
  def keep(path, leaf):
    names = [str(getattr(k, "key", k)).lower() for k in path]
    if any("norm" in n or n.startswith("zero_") for n in names):
      return False
    last = names[-1] if names else ""
    if last in ("scale", "bias") or last.endswith(("_bias", "_scale")):
      return False
    return getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
