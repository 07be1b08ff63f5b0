"""What several implementations share: the zero slot's logit, and padding to a block or channel
multiple. reference and chunked compute z the same way, so a masked slot (-inf) gives both the
arithmetic of attention without a zero slot."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def zero_logit(q_BxTxHxK: Array, zero_key_HxK: Array, zero_bias_H: Optional[Array] = None,
               mask_zero_slot: Optional[Array] = None) -> Array:
  """z_BxHxT float32: scale * q . zero_key (+ bias); -inf where mask_zero_slot."""
  scale = 1.0 / jnp.sqrt(jnp.float32(q_BxTxHxK.shape[-1]))
  z_BxHxT = jnp.einsum("bthk,hk->bht", q_BxTxHxK, zero_key_HxK.astype(q_BxTxHxK.dtype),
                       preferred_element_type=jnp.float32) * scale
  if zero_bias_H is not None:
    z_BxHxT = z_BxHxT + zero_bias_H.astype(jnp.float32)[None, :, None]
  if mask_zero_slot is not None:
    z_BxHxT = jnp.where(mask_zero_slot, -jnp.inf, z_BxHxT)
  return z_BxHxT
