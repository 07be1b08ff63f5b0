"""Exit signals and the exit rule; pure functions on float32 signals."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ztt_jax.errors import ConfigError

Array = jax.Array

EXIT_SIGNALS = ("zero_attention", "confidence")


def confidence(logits_BxTxV: Array) -> Array:
  """CALM-style signal: the max softmax probability of the read-out logits, float32 [B,T]."""
  return jnp.max(jax.nn.softmax(logits_BxTxV.astype(jnp.float32), axis=-1), axis=-1)


def update_exited(exited_BxT: Array, signal_BxT: Array, cycles_run, threshold, min_cycles: int,
                  granularity: str) -> Array:
  """Tokens that have exited after `cycles_run` (1-based) cycles. Exit is sticky.

  token: a token exits once its own signal >= threshold (causal: its signal depends only on tokens
  <= it). sequence: every token of a sequence exits once the mean signal over the sequence >= threshold.
  """
  if granularity == "sequence":
    s_Bx1 = jnp.mean(signal_BxT, axis=1, keepdims=True)
    hit_BxT = jnp.broadcast_to(s_Bx1 >= threshold, signal_BxT.shape)
  elif granularity == "token":
    hit_BxT = signal_BxT >= threshold
  else:
    raise ConfigError(f"exit_granularity={granularity!r}: use 'token' or 'sequence'")
  return exited_BxT | (hit_BxT & (cycles_run >= min_cycles))
