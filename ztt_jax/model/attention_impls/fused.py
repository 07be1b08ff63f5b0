"""cudnn (GPU) and pallas (TPU): one exact construction of zero-slot attention on a standard causal
flash kernel, which the kernel modules (cudnn.py, pallas.py) plug into `fused_attention`.

The kernels' own VJPs do all the differentiation; we only rearrange inputs. With
Kp = round_up(K + 2, 8) channels:
  queries: a dummy query row 0 of zeros, then [q, 1, 1, 0...]                      [B, T+1, H, Kp]
  keys:    row 0 = the zero key [zero_key, b_hi, b_lo, 0...], then [k, 0, 0, 0...] [B, S+1, H, Kp]
  values:  row 0 = [0..0, 1, 0...] (a one in channel K), then [v, 0, 0, 0...]
where b_hi + b_lo = zero_bias / scale (b_lo carries the bf16 rounding error of b_hi; -1e9 / scale
when the slot is masked). The kernel's top-left causal mask lets row t+1 see key rows 0..t+1: the
zero key plus real keys 0..t, exactly the zero-slot softmax; its logit on row 0 is
scale (q . zero_key + b_hi + b_lo) = z. Output channels :K are `out`, channel K is
sum_j P[t, j] v[j, K] = a0 exactly, and gradients reach q, k, v, the zero key and the bias through
the kernel's VJP. The dummy row sees only row 0, so its softmax is finite, and its output is
dropped (zero cotangent). Chosen over "out_real, L -> a0 = sigmoid(z - L)" because the installed
kernels do not differentiate their log-sum-exp: jax.nn.dot_product_attention(return_residual=True)
on cuDNN drops the residual's cotangent (fused_attention_stablehlo._dot_product_attention_bwd_rule)
and rounds it to the output dtype, and the public Pallas TPU flash_attention returns no residuals
(its internal save_residuals path refuses differentiation).

Costs: one extra query/key row and Kp/K more channels (K=64: 72, K=128: 136 on cuDNN; on TPU the
kernel needs head_dim <= 128 or a multiple of 128, so K=128 pads to 256, doubling the kernel's
work). a0 comes out in the kernel's dtype (bf16 on cuDNN: relative error <= 2^-9).

These kernels cover the training / full-sequence case (queries are the keys, positions 0..T-1).
Calls with query positions (decoding against a KV cache, T != S) go to `chunked`, whose dynamic
trip counts also skip the unwritten tail of the cache.

Numerics on the devices are checked by benchmarks/gpu.sh through benchmarks/attention_check.py; on
CPU the tests run the same construction through jax.nn.dot_product_attention(implementation='xla')
(cudnn.xla_kernel) and (opt-in, ~30 s: ZTT_TEST_PALLAS_INTERPRET=1) the Pallas TPU kernel in
interpret mode.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from ztt_jax.model.attention_impls.common import Array, round_up

_NEG_BIG = -1e9  # the masked zero slot's logit in the construction (exp underflows to 0)


def augment_for_causal_kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H=None,
                              mask_zero_slot=None, multiple: int = 8):
  """The dummy-query / zero-key-row construction of the module docstring.

  Returns (q, k, v) [B, T+1, H, Kp] in q's dtype, Kp = round_up(K + 2, multiple).
  """
  B, T, H, K = q_BxTxHxK.shape
  S = k_BxSxHxK.shape[1]
  dt = q_BxTxHxK.dtype
  Kp = round_up(K + 2, multiple)
  scale = 1.0 / math.sqrt(K)
  b_H = jnp.zeros((H,), jnp.float32) if zero_bias_H is None else zero_bias_H.astype(jnp.float32)
  if mask_zero_slot is not None:
    b_H = jnp.where(mask_zero_slot, _NEG_BIG, b_H)
  b_H = b_H / scale
  b_hi_H = b_H.astype(dt)
  b_lo_H = (b_H - b_hi_H.astype(jnp.float32)).astype(dt)  # what b_hi's rounding lost

  def pad_channels(x, n, extra=None):
    parts = [x] if extra is None else [x, extra]
    width = sum(p.shape[-1] for p in parts)
    return jnp.concatenate(parts + [jnp.zeros(x.shape[:-1] + (n - width,), dt)], axis=-1)

  ones_BxTxHx2 = jnp.ones((B, T, H, 2), dt)
  q_rows = pad_channels(q_BxTxHxK.astype(dt), Kp, ones_BxTxHx2)
  q_aug = jnp.concatenate([jnp.zeros((B, 1, H, Kp), dt), q_rows], axis=1)
  zk_1xHxK = zero_key_HxK.astype(dt)[None]
  zk_row = pad_channels(zk_1xHxK, Kp, jnp.stack([b_hi_H, b_lo_H], axis=-1)[None])
  k_aug = jnp.concatenate([jnp.broadcast_to(zk_row[None], (B, 1, H, Kp)),
                           pad_channels(k_BxSxHxK.astype(dt), Kp)], axis=1)
  v_row = jnp.zeros((B, 1, H, Kp), dt).at[..., K].set(1)
  v_aug = jnp.concatenate([v_row, pad_channels(v_BxSxHxK.astype(dt), Kp)], axis=1)
  del S
  return q_aug, k_aug, v_aug


def fused_attention(kernel: Callable, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK=None, zero_bias_H=None,
                    mask_zero_slot=None, multiple: int = 8, window=None) -> tuple[Array, Array]:
  """Zero-slot attention through `kernel(q, k, v, scale) -> out`, a causal (top-left) attention on
  [B, T, H, K] inputs with its own VJP. Training case only: T == S, positions 0..T-1.
  window: the kernel's own sliding window (`kernel(..., window=)`); only without a zero key, whose
  row the window would hide (cudnn.problem)."""
  B, T, H, K = q_BxTxHxK.shape
  scale = 1.0 / math.sqrt(K)
  if window is not None:
    if zero_key_HxK is not None:
      raise ValueError("the fused zero-slot construction cannot run under a sliding window; use chunked")
    return kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale, window=window).astype(v_BxSxHxK.dtype), \
        jnp.zeros((B, H, T), jnp.float32)
  if zero_key_HxK is None:
    out_BxTxHxK = kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale)
    return out_BxTxHxK.astype(v_BxSxHxK.dtype), jnp.zeros((B, H, T), jnp.float32)
  q_aug, k_aug, v_aug = augment_for_causal_kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H,
                                                  mask_zero_slot, multiple)
  o_aug = kernel(q_aug, k_aug, v_aug, scale)
  out_BxTxHxK = o_aug[:, 1:, :, :K].astype(v_BxSxHxK.dtype)
  a0_BxHxT = o_aug[:, 1:, :, K].astype(jnp.float32).transpose(0, 2, 1)
  return out_BxTxHxK, a0_BxHxT
