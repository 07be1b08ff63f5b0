"""`reference`: the [B, H, T, S] scores and probabilities written out; the oracle the other
implementations are tested against, and what a dense [T, S] mask (valid_TxS) always runs."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ztt_jax.model.attention_impls.common import Array, zero_logit


def visible_TxS(T: int, S: int, q_positions_T: Optional[Array] = None, window: Optional[int] = None,
                first_key=0) -> Array:
  """[T, S] bool: which keys each query sees. Key s sits at position s; the queries at
  q_positions_T (default: the last T keys). Causal, within the last `window` positions, and not
  before first_key (empty slots of a rolling cache)."""
  pos_T = jnp.arange(T) + (S - T) if q_positions_T is None else jnp.asarray(q_positions_T)
  d_TxS = pos_T[:, None] - jnp.arange(S)[None, :]
  visible_TxS = (d_TxS >= 0) & (jnp.arange(S)[None, :] >= first_key)
  return visible_TxS if window is None else visible_TxS & (d_TxS < window)


def reference_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                        zero_key_HxK: Optional[Array] = None, zero_bias_H: Optional[Array] = None,
                        mask_zero_slot: Optional[Array] = None,
                        valid_TxS: Optional[Array] = None) -> tuple[Array, Array]:
  """The dense oracle: [B, H, T, S] float32 scores. Arguments as `zero_slot_attention`.

  The softmax is written out by hand rather than concatenating a column: with the zero logit at -inf
  (`mask_zero_slot`), the arithmetic is then bit-identical to attention without a zero slot.
  """
  B, T, H, K = q_BxTxHxK.shape
  S = k_BxSxHxK.shape[1]
  scale = 1.0 / jnp.sqrt(jnp.float32(K))
  s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                         preferred_element_type=jnp.float32) * scale
  causal_TxS = visible_TxS(T, S) if valid_TxS is None else valid_TxS
  s_BxHxTxS = jnp.where(causal_TxS[None, None], s_BxHxTxS, -jnp.inf)
  m_BxHxT = jnp.max(s_BxHxTxS, axis=-1)
  if zero_key_HxK is not None:
    z_BxHxT = zero_logit(q_BxTxHxK, zero_key_HxK, zero_bias_H, mask_zero_slot)
    m_BxHxT = jnp.maximum(m_BxHxT, z_BxHxT)
  # Every row has its diagonal key, so m is finite and no row is all -inf.
  m_BxHxT = jax.lax.stop_gradient(m_BxHxT)
  e_BxHxTxS = jnp.exp(s_BxHxTxS - m_BxHxT[..., None])
  denom_BxHxT = jnp.sum(e_BxHxTxS, axis=-1)
  if zero_key_HxK is not None:
    e0_BxHxT = jnp.exp(z_BxHxT - m_BxHxT)
    denom_BxHxT = denom_BxHxT + e0_BxHxT
    a0_BxHxT = e0_BxHxT / denom_BxHxT
  else:
    a0_BxHxT = jnp.zeros((B, H, T), jnp.float32)
  p_BxHxTxS = e_BxHxTxS / denom_BxHxT[..., None]
  out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", p_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)
  return out_BxTxHxK, a0_BxHxT
