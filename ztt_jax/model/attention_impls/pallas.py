"""pallas (TPU): the Pallas TPU flash-attention kernel, fed the construction of fused.py. It pads
T+1 to a multiple of 128 (padded keys sit after every real query, so the causal mask hides them) and
uses the largest of 512/256/128 that divides it as block. Possible refinement: splash attention with
CausalMask(offset=1) over [zero key; keys] needs no dummy query row (not done: untested here)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ztt_jax.model.attention_impls.common import round_up


def pallas_kernel(q, k, v, scale, block: int = 512):
  """The Pallas TPU flash kernel on [B, T, H, K]; pads T to a multiple of 128 at the end (the
  causal mask keeps the padded keys from every real query). Runs on CPU under
  jax.experimental.pallas.tpu.force_tpu_interpret_mode()."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only kernel: lazy
  B, T, H, K = q.shape
  Tp = round_up(T, 128)
  blk = next(b for b in (block, 256, 128) if b <= Tp and Tp % b == 0)
  sizes = tpu_flash.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
                               block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk, block_q_dkv=blk,
                               block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
  to_bhtk = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  o = tpu_flash.flash_attention(to_bhtk(q), to_bhtk(k), to_bhtk(v), causal=True, sm_scale=scale,
                                block_sizes=sizes)
  return o[:, :, :T].transpose(0, 2, 1, 3)


def problem(window: Optional[int] = None) -> Optional[str]:
  if jax.default_backend() != "tpu":
    return f"needs a TPU (the default backend is {jax.default_backend()!r})"
  if window is not None:
    # Possible refinement: splash attention's LocalMask OR'd with a mask of the zero-key column.
    return "has no sliding-window mask in its flash kernel (model.attention_window)"
  return None
