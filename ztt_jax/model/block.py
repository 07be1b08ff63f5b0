"""Pre-norm transformer block and a stack of distinct blocks scanned over a 'layers' axis."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.model import attention_impls
from ztt_jax.model.attention import Attention, LayerOut
from ztt_jax.model.config import ModelConfig
from ztt_jax.model.layers import Mlp, Norm, constrain, logical_param

Array = jax.Array


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)). Returns LayerOut(x, a0 mean over heads [B,T], kv).

  frozen: None, or (exited_BxT, frozen_BxTxD): exited tokens enter this layer with their frozen
    state, so their K/V here are projections of that state (ExitRule.frozen_kv='state').
  positions_T, kv, kv_only: cached decoding, see Attention. kv_only computes only this layer's K/V
    of x (out.kv) and runs nothing else.
  cycle: the cycle index (traced int) when the block is in the cycled stack: per-cycle LoRA deltas and
    norm scales with model.cycle_lora_rank > 0 (model/lora.py); None elsewhere.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, zero_xs, mask_zero_slot: Optional[Array], frozen=None,
               cycle: Optional[Array] = None, *, positions_T: Optional[Array] = None, kv: Optional[dict] = None,
               kv_only: bool = False) -> LayerOut:
    zero_key_HxK, zero_bias_H = zero_xs
    if frozen is not None:
      exited_BxT, frozen_BxTxD = frozen
      x_BxTxD = jnp.where(exited_BxT[..., None], frozen_BxTxD, x_BxTxD)
    attn = Attention(self.cfg, name="attn")
    h_BxTxD = Norm(self.cfg, name="attn_norm")(x_BxTxD, cycle)
    if kv_only:
      return attn(h_BxTxD, positions_T=positions_T, kv_only=True, cycle=cycle)
    out = attn(h_BxTxD, zero_key_HxK, zero_bias_H, mask_zero_slot, positions_T=positions_T, kv=kv, cycle=cycle)
    x_BxTxD = x_BxTxD + out.x
    x_BxTxD = x_BxTxD + Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BxTxD, cycle), cycle)
    return LayerOut(constrain(x_BxTxD), jnp.mean(out.a0, axis=1), out.kv)


def zero_key_init(cfg: ModelConfig):
  if cfg.zero_key_init == "zeros":
    return nn.initializers.zeros
  if cfg.zero_key_init == "truncated_normal":
    return nn.initializers.truncated_normal(cfg.zero_key_init_std)
  return nn.initializers.normal(cfg.zero_key_init_std)


class LayerStack(nn.Module):
  """`n_layers` distinct blocks, params stacked on a leading 'layers' axis (one nn.scan, so the HLO
  holds one block whatever the depth). With `own_zero_key` the stack owns one zero key per layer
  ('zero_key' [n, heads, kv]); otherwise zero keys, if any, come in from the caller (the pool).

  Returns LayerOut(x, a0_LxBxT, kv). kv: the stack's cache {'k','v'} [L, B, M, H, K], scanned with
  the layers (each layer reads and writes its own entry). kv_only: each layer's K/V of the same x
  ([L, B, T, H, K]; the cache entries of frozen tokens), and nothing else runs. cycle: the cycle
  index, passed by the cycled stack (per-cycle LoRA, model/lora.py).
  """
  cfg: ModelConfig
  n_layers: int
  own_zero_key: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: Array, zero_keys_LxHxK: Optional[Array] = None,
               zero_bias_LxH: Optional[Array] = None, mask_zero_slot: Optional[Array] = None,
               frozen=None, *, kv: Optional[dict] = None, positions_T: Optional[Array] = None,
               kv_only: bool = False, cycle: Optional[Array] = None) -> LayerOut:
    cfg = self.cfg
    L, H, K = self.n_layers, cfg.num_heads, cfg.head_dim
    if self.own_zero_key:
      zero_keys_LxHxK = logical_param(self, "zero_key", zero_key_init(cfg), (L, H, K), ("layers", "heads", "kv"))
      if cfg.zero_bias:
        zero_bias_LxH = logical_param(self, "zero_bias", nn.initializers.constant(cfg.zero_bias_init), (L, H),
                                      ("layers", "heads"))
    block = Block
    # Decoding keyword arguments go only to an un-rematted block: decoding has no backward pass to
    # save memory for, and remat would trace the Python flag kv_only.
    decoding = kv is not None or kv_only
    if cfg.remat_policy != "none" and not decoding:
      block = nn.remat(Block, prevent_cse=False, policy=attention_impls.remat_policy(cfg.remat_policy))

    def layer(blk, x_BxTxD, zero_xs, kv, mask_zero_slot, frozen, positions_T, cycle):
      extra = dict(positions_T=positions_T, kv=kv, kv_only=kv_only) if decoding else {}
      out = blk(x_BxTxD, zero_xs, mask_zero_slot, frozen, cycle, **extra)
      return (x_BxTxD, out.kv) if kv_only else (out.x, (out.a0, out.kv))

    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=L,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x_BxTxD, ys = scanned(block(cfg, name="layers"), x_BxTxD, (zero_keys_LxHxK, zero_bias_LxH), kv,
                          mask_zero_slot, frozen, positions_T, cycle)
    if kv_only:
      return LayerOut(None, None, ys)
    a0_LxBxT, kv = ys
    return LayerOut(x_BxTxD, a0_LxBxT, kv)
