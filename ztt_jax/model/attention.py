"""Causal multi-head attention with the optional zero slot.

The zero slot is one extra key in front of the real keys: its key is a learned vector per head (no
RoPE), its value is exactly zero, and it is never masked. Its softmax weight a0[b, h, t] is the zero
attention. Since its value is zero, the output is the weighted sum over real tokens only, which equals
(1 - a0) times ordinary causal attention.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.model.config import ModelConfig
from ztt_jax.model.layers import apply_rope, dtype_of, fan_in_init, logical_param

Array = jax.Array


def zero_slot_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                        zero_key_HxK: Optional[Array] = None, zero_bias_H: Optional[Array] = None,
                        mask_zero_slot: Optional[Array] = None,
                        valid_TxS: Optional[Array] = None) -> tuple[Array, Array]:
  """Returns (out_BxTxHxK in v's dtype, a0_BxHxT float32; zeros without a zero key).

  valid_TxS: which keys each query may see; default causal with the queries as the last T keys.
  Decoding passes it because its keys are a fixed-size cache whose tail is not written yet.

  The softmax is written out by hand rather than concatenating a column: with the zero logit at -inf
  (`mask_zero_slot`), the arithmetic is then bit-identical to attention without a zero slot.
  """
  B, T, H, K = q_BxTxHxK.shape
  S = k_BxSxHxK.shape[1]
  scale = 1.0 / jnp.sqrt(jnp.float32(K))
  s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                         preferred_element_type=jnp.float32) * scale
  causal_TxS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :] if valid_TxS is None else valid_TxS
  s_BxHxTxS = jnp.where(causal_TxS[None, None], s_BxHxTxS, -jnp.inf)
  m_BxHxT = jnp.max(s_BxHxTxS, axis=-1)
  if zero_key_HxK is not None:
    z_BxHxT = jnp.einsum("bthk,hk->bht", q_BxTxHxK, zero_key_HxK.astype(q_BxTxHxK.dtype),
                         preferred_element_type=jnp.float32) * scale
    if zero_bias_H is not None:
      z_BxHxT = z_BxHxT + zero_bias_H.astype(jnp.float32)[None, :, None]
    if mask_zero_slot is not None:
      z_BxHxT = jnp.where(mask_zero_slot, -jnp.inf, z_BxHxT)
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


class Attention(nn.Module):
  """Projections q/k/v [embed, heads, kv], out [heads, kv, embed], optional biases, RoPE.

  Decoding (ztt_jax/decoding.py) adds three keyword arguments; without them nothing changes:
  positions_T: absolute positions of the T inputs (RoPE), default 0..T-1.
  kv_cache: (k_BxMxHxK, v_BxMxHxK), RoPE'd keys and values of positions 0..M-1. The new keys and
    values are written at positions_T (contiguous), the queries attend to cache positions <= their
    own, and the call returns (y, a0, (k_cache, v_cache)).
  kv_only: return just the new (k_BxTxHxK, v_BxTxHxK): the cache entries of a frozen token.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, zero_key_HxK: Optional[Array] = None,
               zero_bias_H: Optional[Array] = None, mask_zero_slot: Optional[Array] = None, *,
               positions_T: Optional[Array] = None, kv_cache: Optional[tuple] = None, kv_only: bool = False):
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    qkv_init = fan_in_init(0, (1, 2))

    def proj(name):
      w_DxHxK = logical_param(self, f"{name}_kernel", qkv_init, (D, H, K), ("embed", "heads", "kv"))
      y_BxTxHxK = jnp.einsum("btd,dhk->bthk", x_BxTxD, w_DxHxK.astype(dt))
      if cfg.use_bias:
        y_BxTxHxK = y_BxTxHxK + logical_param(self, f"{name}_bias", nn.initializers.zeros, (H, K),
                                              ("heads", "kv")).astype(dt)
      return y_BxTxHxK

    # Creation order q, k, v fixes which init rng each kernel gets; keep it.
    q = None if kv_only else proj("q")
    k, v = proj("k"), proj("v")
    pos_T = jnp.arange(x_BxTxD.shape[1]) if positions_T is None else positions_T
    if cfg.position == "rope":
      k = apply_rope(k, pos_T, cfg.rope_theta)
      q = None if kv_only else apply_rope(q, pos_T, cfg.rope_theta)
    if kv_only:
      return k, v
    valid_TxS = None
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      start = (0, pos_T[0], 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      valid_TxS = jnp.arange(k.shape[1])[None, :] <= pos_T[:, None]
    o_BxTxHxK, a0_BxHxT = zero_slot_attention(q, k, v, zero_key_HxK, zero_bias_H, mask_zero_slot, valid_TxS)
    wo_HxKxD = logical_param(self, "o_kernel", fan_in_init((0, 1), 2), (H, K, D), ("heads", "kv", "embed"))
    y_BxTxD = jnp.einsum("bthk,hkd->btd", o_BxTxHxK, wo_HxKxD.astype(dt))
    if cfg.use_bias:
      y_BxTxD = y_BxTxD + logical_param(self, "o_bias", nn.initializers.zeros, (D,), ("embed",)).astype(dt)
    if kv_cache is not None:
      return y_BxTxD, a0_BxHxT, (k, v)
    return y_BxTxD, a0_BxHxT
