"""cudnn (GPU): cuDNN's causal flash attention through jax.nn.dot_product_attention, fed the
construction of fused.py. cuDNN needs bf16/fp16 inputs and head dims that are multiples of 8 up to
128 (256 from Hopper on); the zero slot's two extra channels count towards that limit.

A sliding window (model.attention_window) runs as cuDNN's local window in layers without a zero
slot. With one it cannot: the construction's zero key is a row in front of the keys, which the
window would hide from every query past the first w - 1, so those calls run chunked."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ztt_jax.model.attention_impls.common import round_up


def _local(window: Optional[int]):
  # (left, right): w keys, the query's own included; None: plain causal.
  return None if window is None else (window - 1, 0)


def cudnn_kernel(q, k, v, scale, window: Optional[int] = None):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=_local(window),
                                      implementation="cudnn")


def xla_kernel(q, k, v, scale, window: Optional[int] = None):
  """jax.nn.dot_product_attention's XLA path: the same API and mask as cudnn, on any backend (tests)."""
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=_local(window),
                                      implementation="xla")


def problem(dtype, head_dim: int, zero_slot: bool, window: Optional[int] = None) -> Optional[str]:
  """Why cuDNN flash attention cannot run this call, or None."""
  if jax.default_backend() != "gpu":
    return f"needs a CUDA GPU (the default backend is {jax.default_backend()!r})"
  if zero_slot and window is not None:
    return ("cannot keep the zero slot visible under a sliding window (model.attention_window; its local "
            "window would hide the zero-key row)")
  try:
    kind = jax.devices()[0].compute_capability  # e.g. '9.0'
    hopper = tuple(int(x) for x in str(kind).split(".")) >= (9, 0)
  except Exception:  # ROCm or a device without the attribute: cuDNN is CUDA only
    return "needs an NVIDIA GPU with cuDNN"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name} (set model.dtype=bfloat16)"
  kp = round_up(head_dim + 2, 8) if zero_slot else head_dim
  limit = 256 if hopper else 128
  if kp > limit or kp % 8:
    return (f"supports head dims that are multiples of 8 up to {limit} on this GPU; the zero slot "
            f"needs {kp} for head_dim={head_dim}")
  return None
