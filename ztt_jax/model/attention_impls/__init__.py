"""Implementations of zero-slot attention behind `model.attention_impl`, and the choice between them.

All of them compute, per batch row b, head h and query t at absolute position pos[t]:

  s[t, s] = scale * q[t] . k[s]                       for keys s <= pos[t]  (scale = 1/sqrt(K))
  z[t]    = scale * q[t] . zero_key + zero_bias       the zero slot's logit (-inf when masked)
  L[t]    = log(exp(z[t]) + sum_s exp(s[t, s]))       log-sum-exp over the zero slot and the keys
  a0[t]   = exp(z[t] - L[t])                          softmax mass on the zero slot
  out[t]  = sum_s exp(s[t, s] - L[t]) v[s]            the zero slot's value is 0

  reference.py  the dense oracle
  chunked.py    flash-style blockwise forward and custom VJP, pure JAX (every backend; decoding)
  fused.py      the exact construction that runs the zero slot on a standard causal flash kernel,
  cudnn.py        ... on cuDNN (GPU)
  pallas.py       ... on the Pallas TPU kernel

auto (the default)
  GPU: cudnn where supported (bf16/fp16, head dim), else chunked. TPU: pallas. CPU: chunked, which
  measured at least as fast as reference from T=64 on (`CPU_CHUNKED_MIN_LEN` has the figures).
  With a sliding window (model.attention_window): cudnn only in layers without a zero slot, never
  pallas; chunked otherwise, which skips the key blocks outside the window.

The device check of every implementation against the reference is benchmarks/attention_check.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ztt_jax.errors import ConfigError
from ztt_jax.model.attention_impls import cudnn, pallas
from ztt_jax.model.attention_impls.chunked import SAVED_NAMES, chunked_attention
from ztt_jax.model.attention_impls.cudnn import cudnn_kernel, xla_kernel
from ztt_jax.model.attention_impls.fused import augment_for_causal_kernel, fused_attention
from ztt_jax.model.attention_impls.pallas import pallas_kernel
from ztt_jax.model.attention_impls.reference import reference_attention, visible_TxS
from ztt_jax.model.config import ATTENTION_IMPLS

__all__ = ["attention", "resolve", "remat_policy", "reference_attention", "chunked_attention",
           "fused_attention", "augment_for_causal_kernel", "cudnn_kernel", "xla_kernel", "pallas_kernel",
           "CPU_CHUNKED_MIN_LEN"]

# CPU, `auto`: below this many keys the dense reference runs, from here on chunked. 0: chunked
# always, since chunked was >= 0.95x the reference's train-step speed everywhere measured.
# Train steps of configs/text.py:ztt (d128, 4 heads, 4 layers x 3 cycles, AdamW, float32, block
# 128), min over interleaved repeats, 2-core machine with load ~0 (uptime 0.02-1.4):
#   T=64 (batch 12): chunked 0.97x reference;  T=256 (batch 4): 1.29x (1.35x with the residuals
#   kept under remat, `remat_policy`);  T=2048 (batch 4): 1.52x.
# Under load 9-19 (shared machine) the same runs gave 1.01x, 0.94-1.58x and 2.46x: noise, same sign.
# Attention alone (fwd+bwd, B4 H4 K32, loaded): T=256 0.0051 s vs 0.0066 s; T=2048 0.22 s vs 2.0 s.
CPU_CHUNKED_MIN_LEN = 0


def resolve(impl: str, *, seq_len: int, dtype, head_dim: int, zero_slot: bool = True, window=None) -> str:
  """The implementation `impl` means for one call on this backend: reference | chunked | cudnn | pallas.

  Raises ConfigError when an explicitly requested fused kernel cannot run here."""
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl={impl!r}: unknown; use one of {', '.join(ATTENTION_IMPLS)}")
  if impl == "cudnn":
    problem = cudnn.problem(dtype, head_dim, zero_slot, window)
    if problem:
      raise ConfigError(f"model.attention_impl='cudnn' {problem}; use model.attention_impl=auto (picks what "
                        "this machine supports) or chunked (any backend)")
  elif impl == "pallas":
    problem = pallas.problem(window)
    if problem:
      raise ConfigError(f"model.attention_impl='pallas' {problem}; use model.attention_impl=auto or chunked")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "gpu":
    return "chunked" if cudnn.problem(dtype, head_dim, zero_slot, window) else "cudnn"
  if backend == "tpu":
    return "chunked" if pallas.problem(window) else "pallas"
  return "chunked" if seq_len >= CPU_CHUNKED_MIN_LEN else "reference"


def attention(impl: str, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK=None, zero_bias_H=None,
              mask_zero_slot=None, *, q_positions_T=None, valid_TxS=None, block_size: int = 0,
              window=None, first_key=0):
  """Dispatch to one implementation (see `ztt_jax.model.attention.zero_slot_attention`).

  Grouped-query attention: k and v may have G heads dividing q's H; each serves H / G consecutive
  query heads (Llama's layout). They are repeated to H heads here, so every implementation sees
  plain multi-head attention and the zero key stays per query head; the cache keeps G heads."""
  H, G = q_BxTxHxK.shape[2], k_BxSxHxK.shape[2]
  if G != H:
    k_BxSxHxK, v_BxSxHxK = (jnp.repeat(a, H // G, axis=2) for a in (k_BxSxHxK, v_BxSxHxK))
  T, S = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
  K = q_BxTxHxK.shape[-1]
  name = resolve(impl, seq_len=S, dtype=q_BxTxHxK.dtype, head_dim=K, zero_slot=zero_key_HxK is not None,
                 window=window)
  args = (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H, mask_zero_slot)
  if valid_TxS is not None or name == "reference":
    if valid_TxS is None:
      valid_TxS = visible_TxS(T, S, q_positions_T, window, first_key)
    return reference_attention(*args, valid_TxS=valid_TxS)
  if name in ("cudnn", "pallas") and q_positions_T is None and T == S:
    kernel = cudnn_kernel if name == "cudnn" else pallas_kernel
    return fused_attention(kernel, *args, window=window)
  # Decoding (query positions against a cache) and everything else: chunked.
  return chunked_attention(*args, q_positions_T=q_positions_T, block_size=block_size, window=window,
                           first_key=first_key)


def remat_policy(name: str):
  """The jax.checkpoint policy for model.remat_policy=`name` ('none' -> None).

  Under dots_with_no_batch_dims_saveable the chunked forward's outputs (SAVED_NAMES: out, lse, a0,
  O(T) each) are kept as well: without them remat re-runs the whole blockwise forward in the
  backward pass just to rebuild its residuals. nothing_saveable keeps nothing, as it says.
  """
  if name == "none":
    return None
  policy = getattr(jax.checkpoint_policies, name)
  if name == "dots_with_no_batch_dims_saveable":
    policy = jax.checkpoint_policies.save_from_both_policies(
        policy, jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES))
  return policy
