"""Causal multi-head attention with the optional zero slot.

The zero slot is one extra key in front of the real keys: its key is a learned vector per head (no
RoPE), its value is exactly zero, and it is never masked. Its softmax weight a0[b, h, t] is the zero
attention. Since its value is zero, the output is the weighted sum over real tokens only, which equals
(1 - a0) times ordinary causal attention.
"""
from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.model import attention_impls, lora
from ztt_jax.model.config import ModelConfig
from ztt_jax.model.layers import apply_rope, dtype_of, fan_in_init, logical_param

Array = jax.Array


def zero_slot_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                        zero_key_HxK: Optional[Array] = None, zero_bias_H: Optional[Array] = None,
                        mask_zero_slot: Optional[Array] = None,
                        valid_TxS: Optional[Array] = None, *, q_positions_T: Optional[Array] = None,
                        impl: str = "reference", block_size: int = 0,
                        window: Optional[int] = None, first_key=0) -> tuple[Array, Array]:
  """Returns (out_BxTxHxK in v's dtype, a0_BxHxT float32; zeros without a zero key).

  q_positions_T: absolute positions of the queries (key s is at position s); a query sees the keys
    at positions <= its own. Default: causal with the queries as the last T keys. Decoding passes
    it because its keys are a fixed-size cache whose tail is not written yet.
  valid_TxS: an explicit [T, S] mask instead (dense: always runs the reference; `window` is then
    ignored: the mask says it all).
  window: model.attention_window; a query at position t also needs t - s < window to see key s.
    The zero slot is always visible.
  first_key: keys before this index are empty slots, hidden (a rolling cache not yet full).
  impl: model.attention_impl, auto | reference | chunked | cudnn | pallas; block_size: the chunked
    implementation's block (model.attention_block_size). See ztt_jax/model/attention_impls/.

  reference writes the softmax out by hand: with the zero logit at -inf (`mask_zero_slot`) its
  arithmetic is then bit-identical to attention without a zero slot.
  """
  return attention_impls.attention(impl, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H,
                                   mask_zero_slot, q_positions_T=q_positions_T, valid_TxS=valid_TxS,
                                   block_size=block_size, window=window, first_key=first_key)


def ring_keys(ring_BxRxHxK: Array, new_BxTxHxK: Array, offset, axis: int = 1) -> tuple[Array, Array]:
  """A rolling cache of R entries (model.attention_window): position p sits in slot p % R.

  Given the ring of the positions before `offset` and T new entries at offset.., returns the keys in
  position order, [ring; new] at positions offset-R..offset+T-1 (the first R - offset are empty
  slots while offset < R), and the ring after writing the new entries (the last R of those)."""
  R, T = ring_BxRxHxK.shape[axis], new_BxTxHxK.shape[axis]
  seq = jnp.concatenate([jnp.roll(ring_BxRxHxK, -(offset % R), axis),
                         new_BxTxHxK.astype(ring_BxRxHxK.dtype)], axis)
  return seq, jnp.roll(jax.lax.slice_in_dim(seq, T, T + R, axis=axis), (offset + T) % R, axis)


@flax.struct.dataclass
class LayerOut:
  """What Attention, Block and LayerStack return.

  x: the output [B,T,D] (Attention: its projection, before the residual; Block/LayerStack: the new
    state). None for kv_only.
  a0: zero attention, float32: Attention [B,H,T]; Block [B,T] (mean over heads); LayerStack
    [L,B,T]. None for kv_only.
  kv: the K/V cache {'k', 'v'} after writing the new tokens (LayerStack: a leading layers axis), the
    new tokens' own K/V for kv_only, or None without a cache.
  """
  x: Optional[Array]
  a0: Optional[Array]
  kv: Optional[dict] = None


class Attention(nn.Module):
  """Projections q [embed, heads, kv], k/v [embed, kv_heads, kv] (model.num_kv_heads), out
  [heads, kv, embed], optional biases, RoPE.

  Cached decoding (ZTTModel.extend) adds three keyword arguments; without them nothing changes:
  positions_T: absolute positions of the T inputs (RoPE), default 0..T-1.
  kv: {'k': k_BxMxGxK, 'v': v_BxMxGxK} (G = kv heads), RoPE'd keys and values of positions 0..M-1. The new keys and
    values are written at positions_T (contiguous), the queries attend to cache positions <= their
    own, and out.kv is the written cache. With model.attention_window the cache is a ring of
    M = min(window, max_len) entries instead (`ring_keys`): O(window) memory whatever the length.
  kv_only: compute just the new tokens' K/V (out.kv, [B,T,H,K] each): a frozen token's cache entries.
  cycle: the cycle index (traced int) in a cycled layer: adds the per-cycle LoRA deltas (model/lora.py).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, zero_key_HxK: Optional[Array] = None,
               zero_bias_H: Optional[Array] = None, mask_zero_slot: Optional[Array] = None, *,
               positions_T: Optional[Array] = None, kv: Optional[dict] = None, kv_only: bool = False,
               cycle: Optional[Array] = None) -> LayerOut:
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    qkv_init = fan_in_init(0, (1, 2))
    on = lora.active(cfg, cycle)  # per-cycle LoRA deltas (a cycled layer, model/lora.py)

    def proj(name):
      # k and v have cfg.kv_heads heads (grouped-query attention), on their own logical axis so the
      # mesh can split them apart from the query heads (partitioning.param_shardings).
      h, axis = (H, "heads") if name == "q" else (cfg.kv_heads, "kv_heads")
      w_DxHxK = logical_param(self, f"{name}_kernel", qkv_init, (D, h, K), ("embed", axis, "kv"))
      y_BxTxHxK = jnp.einsum("btd,dhk->bthk", x_BxTxD, w_DxHxK.astype(dt))
      if on:
        y_BxTxHxK = y_BxTxHxK + lora.delta(self, name, x_BxTxD, "d", (D,), ("embed",), "hk", (h, K), (axis, "kv"),
                                           cycle)
      if cfg.use_bias:
        y_BxTxHxK = y_BxTxHxK + logical_param(self, f"{name}_bias", nn.initializers.zeros, (h, K),
                                              (axis, "kv")).astype(dt)
      return y_BxTxHxK

    # Creation order q, k, v fixes which init rng each kernel gets; keep it.
    q = None if kv_only else proj("q")
    k, v = proj("k"), proj("v")
    pos_T = jnp.arange(x_BxTxD.shape[1]) if positions_T is None else positions_T
    if cfg.position == "rope":
      k = apply_rope(k, pos_T, cfg.rope_theta)
      q = None if kv_only else apply_rope(q, pos_T, cfg.rope_theta)
    if kv_only:
      return LayerOut(None, None, {"k": k, "v": v})
    q_positions_T, first_key = None, 0
    if kv is not None and cfg.attention_window is not None:
      # Attend to [ring; new] in position order, key s at position offset - R + s.
      R, offset = kv["k"].shape[1], pos_T[0]
      k, ring_k = ring_keys(kv["k"], k, offset)
      v, ring_v = ring_keys(kv["v"], v, offset)
      q_positions_T, first_key = pos_T - offset + R, R - offset
    elif kv is not None:
      start = (0, pos_T[0], 0, 0)
      k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)
      q_positions_T = pos_T  # the cache's unwritten tail lies after every query
    o_BxTxHxK, a0_BxHxT = zero_slot_attention(q, k, v, zero_key_HxK, zero_bias_H, mask_zero_slot,
                                              q_positions_T=q_positions_T, impl=cfg.attention_impl,
                                              block_size=cfg.attention_block_size,
                                              window=cfg.attention_window, first_key=first_key)
    wo_HxKxD = logical_param(self, "o_kernel", fan_in_init((0, 1), 2), (H, K, D), ("heads", "kv", "embed"))
    y_BxTxD = jnp.einsum("bthk,hkd->btd", o_BxTxHxK, wo_HxKxD.astype(dt))
    if on:
      y_BxTxD = y_BxTxD + lora.delta(self, "o", o_BxTxHxK, "hk", (H, K), ("heads", "kv"), "d", (D,), ("embed",), cycle)
    if cfg.use_bias:
      y_BxTxD = y_BxTxD + logical_param(self, "o_bias", nn.initializers.zeros, (D,), ("embed",)).astype(dt)
    if kv is not None and cfg.attention_window is not None:
      k, v = ring_k, ring_v
    return LayerOut(y_BxTxD, a0_BxHxT, None if kv is None else {"k": k, "v": v})
