"""`chunked`: blockwise zero-slot attention in pure JAX, on every backend.

Flash-attention style. Forward: for each query block, a `fori_loop` over the key blocks it can see
keeps the running max m, denominator l and un-normalised output acc. The zero slot is folded in by
*initialising* the state with it, as if it were key -1: m = z, l = exp(z - m) = 1 (0 when z = -inf),
acc = 0 (its value is zero). Each key block then does the usual update
  m' = max(m, max_s s),  alpha = exp(m - m'),  p = exp(s - m'),
  l' = alpha l + sum_s p,  acc' = alpha acc + p v.
At the end out = acc / l, L = m + log l and a0 = exp(z - m) / l: exact (f32 rounding only), with
no extra pass. Only out, L and a0 (O(T) each, plus the inputs) are saved for the backward
(`jax.custom_vjp`).

Backward (FlashAttention-2 with the zero slot as one more softmax column of value 0). With
P[t, s] = exp(s[t, s] - L[t]) recomputed blockwise from L, and cotangents dout, da0:
  dP[t, s] = dout[t] . v[s]  (real keys),  dP[t, 0] = da0[t]  (zero slot, value 0)
  D[t]     = sum_j P[t, j] dP[t, j] = dout[t] . out[t] + a0[t] da0[t]
  ds[t, s] = P[t, s] (dP[t, s] - D[t]),   dz[t] = a0[t] (da0[t] - D[t])
  dq = scale ds k,  dk = scale ds^T q,  dv = P^T dout
dz is O(T) and goes back through z = scale q . zero_key + bias by ordinary autodiff, which gives
the zero key, the zero bias and q their share. The loop runs over key blocks (outer `scan`,
carrying dq) and the query blocks that can see each (inner `fori_loop`, accumulating dk, dv).
Neither pass holds more than [B, H, block, block] scores; memory is O(T * block).

Causal skipping: query block i visits key blocks 0..max(pos in block i) // block_k only, and key
block j visits query blocks from the first whose last position reaches it (query positions must be
non-decreasing, which both training (0..T-1) and decoding (offset..offset+T-1) are), so a causal
training step does about half the work of the dense product. Lengths that are not a multiple of
the block are padded (queries repeat the last position, keys are masked by position).

Sliding window (model.attention_window = w): a query at position p also needs p - s < w, so query
block i visits only the key blocks from (min(pos in block i) - w + 1) // block_k on, and key block j
only the query blocks up to the last whose first position still reaches it: O(T * w) work, forward
and backward. `first_key` hides the keys before it (a rolling decoding cache not yet full).

Remat: under jax.checkpoint a layer saves only what its policy allows, and the forward's loop
outputs are not dots, so dots_with_no_batch_dims_saveable alone re-runs the whole blockwise
forward inside the backward just to rebuild out/L/a0. The forward names them (SAVED_NAMES) and
`attention_impls.remat_policy(name)` adds them to the policy: the layer then keeps O(T) residuals
per layer and the forward runs once (tests: test_remat_policy_keeps_the_chunked_residuals).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ztt_jax.model.attention_impls.common import Array, round_up, zero_logit

# block_size=0 (model.attention_block_size): CPU keeps a [B,H,128,128] float32 block in cache (block
# 512 was 4x slower than 128 at T=2048 there); accelerators want fewer, larger loop iterations.
DEFAULT_BLOCK = {"cpu": 128}
DEFAULT_BLOCK_OTHER = 512


def _block(n: int, block: int) -> int:
  # A length that fits in one block is its own block: no padding, one iteration.
  return n if n <= block else block


def chunked_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                      zero_key_HxK: Optional[Array] = None, zero_bias_H: Optional[Array] = None,
                      mask_zero_slot: Optional[Array] = None, *, q_positions_T: Optional[Array] = None,
                      block_size: int = 0, window: Optional[int] = None,
                      first_key=0) -> tuple[Array, Array]:
  """Blockwise online-softmax zero-slot attention with a flash-style custom VJP (module docstring).

  q_positions_T: absolute (non-decreasing) positions of the queries; key s sits at position s.
    Default: the queries are the last T of the S keys.
  block_size: query and key block; 0 = the backend's default (DEFAULT_BLOCK).
  window: a query at position p sees keys p-window+1..p only (None: all of 0..p).
  first_key: keys before this index are empty and hidden (may be traced).
  Returns (out_BxTxHxK in v's dtype, a0_BxHxT float32; zeros without a zero key).
  """
  B, T, H, K = q_BxTxHxK.shape
  S = k_BxSxHxK.shape[1]
  scale = 1.0 / math.sqrt(K)
  if zero_key_HxK is not None:
    z_BxHxT = zero_logit(q_BxTxHxK, zero_key_HxK, zero_bias_H, mask_zero_slot)
  else:
    z_BxHxT = jnp.full((B, H, T), -jnp.inf, jnp.float32)
  if q_positions_T is None:
    pos_T = jnp.arange(T, dtype=jnp.int32) + (S - T)
  else:
    # A query past the last key sees all keys; clamping keeps every position inside the key range.
    pos_T = jnp.minimum(jnp.asarray(q_positions_T, jnp.int32), S - 1)
  if block_size <= 0:
    block_size = DEFAULT_BLOCK.get(jax.default_backend(), DEFAULT_BLOCK_OTHER)
  bq, bk = _block(T, block_size), _block(S, block_size)
  Tp, Sp = round_up(T, bq), round_up(S, bk)
  # [B, H, T, K]: each block is then a contiguous slice for the batched matmuls.
  q_BxHxTxK = jnp.pad(q_BxTxHxK.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  k_BxHxSxK = jnp.pad(k_BxSxHxK.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  v_BxHxSxK = jnp.pad(v_BxSxHxK.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  zp_BxHxT = jnp.pad(z_BxHxT, ((0, 0), (0, 0), (0, Tp - T)), constant_values=-jnp.inf)
  # Padded queries repeat the last position: they see keys (finite softmax) and skip nothing extra.
  # Padded keys sit at positions >= S > every query position, so the causal test hides them.
  posp_T = jnp.pad(pos_T, (0, Tp - T), mode="edge")
  first_key = jnp.asarray(first_key, jnp.int32)
  out_BxHxTxK, a0_BxHxT = _flash(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, zp_BxHxT, posp_T, first_key, bq, bk, scale,
                                 window)
  return out_BxHxTxK[:, :, :T].transpose(0, 2, 1, 3), a0_BxHxT[:, :, :T]


def _scores(q_BxHxQxK, k_BxHxCxK, qpos_Q, k0, first_key, scale, window):
  """Masked float32 scores of one (query block, key block) pair; keys start at position k0."""
  s_BxHxQxC = jnp.einsum("bhqk,bhck->bhqc", q_BxHxQxK, k_BxHxCxK, preferred_element_type=jnp.float32) * scale
  kpos_C = k0 + jnp.arange(k_BxHxCxK.shape[2], dtype=jnp.int32)
  d_QxC = qpos_Q[:, None] - kpos_C[None, :]
  visible_QxC = (d_QxC >= 0) & (kpos_C[None, :] >= first_key)
  if window is not None:
    visible_QxC = visible_QxC & (d_QxC < window)
  return jnp.where(visible_QxC[None, None], s_BxHxQxC, -jnp.inf)


def _first_block(pos_Q, first_key, bk, window):
  """The first key block a query block with positions pos_Q can see."""
  lo = first_key if window is None else jnp.maximum(first_key, jnp.min(pos_Q) - window + 1)
  return jnp.maximum(lo, 0) // bk


def _flash_forward(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, first_key, bq, bk, scale, window):
  """Returns (out_BxHxTxK in v's dtype, lse_BxHxT, a0_BxHxT float32)."""
  B, H, Tp, K = q_BxHxTxK.shape
  nq, nk = Tp // bq, k_BxHxSxK.shape[2] // bk
  q_NxBxHxQxK = q_BxHxTxK.reshape(B, H, nq, bq, K).transpose(2, 0, 1, 3, 4)
  z_NxBxHxQ = z_BxHxT.reshape(B, H, nq, bq).transpose(2, 0, 1, 3)
  pos_NxQ = pos_T.reshape(nq, bq)

  def query_block(xs):
    q_BxHxQxK, z_BxHxQ, pos_Q = xs
    # The zero slot is key -1: the state starts as if it had been seen (value 0, so acc = 0).
    m_BxHxQ = z_BxHxQ
    l_BxHxQ = jnp.where(jnp.isneginf(z_BxHxQ), 0.0, 1.0)
    acc_BxHxQxK = jnp.zeros((B, H, bq, K), jnp.float32)
    n_visible = jnp.minimum(nk, jnp.max(pos_Q) // bk + 1)  # later key blocks are all in the future
    j0 = jnp.minimum(_first_block(pos_Q, first_key, bk, window), n_visible)  # earlier: outside the window

    def key_block(j, carry):
      m_BxHxQ, l_BxHxQ, acc_BxHxQxK = carry
      k_BxHxCxK = jax.lax.dynamic_slice_in_dim(k_BxHxSxK, j * bk, bk, axis=2)
      v_BxHxCxK = jax.lax.dynamic_slice_in_dim(v_BxHxSxK, j * bk, bk, axis=2)
      s_BxHxQxC = _scores(q_BxHxQxK, k_BxHxCxK, pos_Q, j * bk, first_key, scale, window)
      m_new_BxHxQ = jnp.maximum(m_BxHxQ, jnp.max(s_BxHxQxC, axis=-1))
      # A row that has seen nothing yet (no zero slot, all keys masked) keeps m = -inf; shifting by
      # 0 instead avoids exp(-inf - -inf) = nan, and its l and acc stay 0.
      m_use_BxHxQ = jnp.where(jnp.isneginf(m_new_BxHxQ), 0.0, m_new_BxHxQ)
      alpha_BxHxQ = jnp.exp(m_BxHxQ - m_use_BxHxQ)
      p_BxHxQxC = jnp.exp(s_BxHxQxC - m_use_BxHxQ[..., None])
      l_BxHxQ = alpha_BxHxQ * l_BxHxQ + jnp.sum(p_BxHxQxC, axis=-1)
      pv_BxHxQxK = jnp.einsum("bhqc,bhck->bhqk", p_BxHxQxC.astype(v_BxHxCxK.dtype), v_BxHxCxK,
                              preferred_element_type=jnp.float32)
      return m_new_BxHxQ, l_BxHxQ, alpha_BxHxQ[..., None] * acc_BxHxQxK + pv_BxHxQxK

    m_BxHxQ, l_BxHxQ, acc_BxHxQxK = jax.lax.fori_loop(j0, n_visible, key_block,
                                                      (m_BxHxQ, l_BxHxQ, acc_BxHxQxK))
    out_BxHxQxK = (acc_BxHxQxK / l_BxHxQ[..., None]).astype(v_BxHxSxK.dtype)
    # a0 = exp(z - m) / l rather than exp(z - lse): one rounding fewer, as the reference computes it.
    a0_BxHxQ = jnp.exp(z_BxHxQ - m_BxHxQ) / l_BxHxQ
    return out_BxHxQxK, m_BxHxQ + jnp.log(l_BxHxQ), a0_BxHxQ

  out_NxBxHxQxK, lse_NxBxHxQ, a0_NxBxHxQ = jax.lax.map(query_block, (q_NxBxHxQxK, z_NxBxHxQ, pos_NxQ))
  out_BxHxTxK = out_NxBxHxQxK.transpose(1, 2, 0, 3, 4).reshape(B, H, Tp, K)
  unblock = lambda x_NxBxHxQ: x_NxBxHxQ.transpose(1, 2, 0, 3).reshape(B, H, Tp)
  return out_BxHxTxK, unblock(lse_NxBxHxQ), unblock(a0_NxBxHxQ)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, first_key, bq, bk, scale, window):
  out_BxHxTxK, _, a0_BxHxT = _flash_forward(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, first_key, bq, bk,
                                            scale, window)
  return out_BxHxTxK, a0_BxHxT


def _flash_fwd(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, first_key, bq, bk, scale, window):
  out_BxHxTxK, lse_BxHxT, a0_BxHxT = _flash_forward(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, first_key,
                                                    bq, bk, scale, window)
  # Named so a remat policy can keep them (`SAVED_NAMES`) instead of re-running the forward loop.
  out_BxHxTxK = checkpoint_name(out_BxHxTxK, "zero_slot_attention_out")
  lse_BxHxT = checkpoint_name(lse_BxHxT, "zero_slot_attention_lse")
  a0_BxHxT = checkpoint_name(a0_BxHxT, "zero_slot_attention_a0")
  return (out_BxHxTxK, a0_BxHxT), (q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, pos_T, first_key, out_BxHxTxK, lse_BxHxT,
                                   a0_BxHxT)


def _flash_bwd(bq, bk, scale, window, res, cotangents):
  q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, pos_T, first_key, out_BxHxTxK, lse_BxHxT, a0_BxHxT = res
  dout_BxHxTxK, da0_BxHxT = cotangents
  B, H, Tp, K = q_BxHxTxK.shape
  Sp = k_BxHxSxK.shape[2]
  nq, nk = Tp // bq, Sp // bk
  # D = sum_j P dP over the zero slot and the keys (module docstring).
  d_BxHxT = jnp.einsum("bhtk,bhtk->bht", dout_BxHxTxK.astype(jnp.float32), out_BxHxTxK.astype(jnp.float32))
  d_BxHxT = d_BxHxT + a0_BxHxT * da0_BxHxT
  # where(): a masked slot has a0 = 0 and z = -inf; keep its cotangent exactly 0.
  dz_BxHxT = jnp.where(a0_BxHxT > 0, a0_BxHxT * (da0_BxHxT - d_BxHxT), 0.0)
  do_BxHxTxK = dout_BxHxTxK.astype(q_BxHxTxK.dtype)
  last_pos_N = pos_T.reshape(nq, bq).max(axis=-1)
  first_pos_N = pos_T.reshape(nq, bq).min(axis=-1)

  def key_block(dq_BxHxTxK, j):
    k_BxHxCxK = jax.lax.dynamic_slice_in_dim(k_BxHxSxK, j * bk, bk, axis=2)
    v_BxHxCxK = jax.lax.dynamic_slice_in_dim(v_BxHxSxK, j * bk, bk, axis=2)
    first_q = jnp.sum(last_pos_N < j * bk)  # earlier query blocks cannot see this key block
    # Later ones see no key of it when it lies outside their window, or before first_key.
    end_q = nq if window is None else jnp.sum(first_pos_N - window + 1 <= j * bk + bk - 1)
    end_q = jnp.where(j * bk + bk <= first_key, first_q, jnp.maximum(end_q, first_q))

    def query_block(i, carry):
      dq_BxHxTxK, dk_BxHxCxK, dv_BxHxCxK = carry
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)
      q_BxHxQxK, do_BxHxQxK, lse_BxHxQ, d_BxHxQ = sl(q_BxHxTxK), sl(do_BxHxTxK), sl(lse_BxHxT), sl(d_BxHxT)
      pos_Q = jax.lax.dynamic_slice_in_dim(pos_T, i * bq, bq)
      s_BxHxQxC = _scores(q_BxHxQxK, k_BxHxCxK, pos_Q, j * bk, first_key, scale, window)
      p_BxHxQxC = jnp.exp(s_BxHxQxC - lse_BxHxQ[..., None])
      dv_BxHxCxK = dv_BxHxCxK + jnp.einsum("bhqc,bhqk->bhck", p_BxHxQxC.astype(do_BxHxQxK.dtype), do_BxHxQxK,
                                           preferred_element_type=jnp.float32)
      dp_BxHxQxC = jnp.einsum("bhqk,bhck->bhqc", do_BxHxQxK, v_BxHxCxK.astype(do_BxHxQxK.dtype),
                              preferred_element_type=jnp.float32)
      ds_BxHxQxC = (p_BxHxQxC * (dp_BxHxQxC - d_BxHxQ[..., None]) * scale).astype(q_BxHxTxK.dtype)
      dk_BxHxCxK = dk_BxHxCxK + jnp.einsum("bhqc,bhqk->bhck", ds_BxHxQxC, q_BxHxQxK,
                                           preferred_element_type=jnp.float32)
      dq_BxHxQxK = jnp.einsum("bhqc,bhck->bhqk", ds_BxHxQxC, k_BxHxCxK.astype(ds_BxHxQxC.dtype),
                              preferred_element_type=jnp.float32)
      dq_BxHxTxK = jax.lax.dynamic_update_slice_in_dim(dq_BxHxTxK, sl(dq_BxHxTxK) + dq_BxHxQxK, i * bq, axis=2)
      return dq_BxHxTxK, dk_BxHxCxK, dv_BxHxCxK

    zeros_BxHxCxK = jnp.zeros((B, H, bk, K), jnp.float32)
    dq_BxHxTxK, dk_BxHxCxK, dv_BxHxCxK = jax.lax.fori_loop(first_q, end_q, query_block,
                                                           (dq_BxHxTxK, zeros_BxHxCxK, zeros_BxHxCxK))
    return dq_BxHxTxK, (dk_BxHxCxK, dv_BxHxCxK)

  dq_BxHxTxK, (dk_NxBxHxCxK, dv_NxBxHxCxK) = jax.lax.scan(
      key_block, jnp.zeros((B, H, Tp, K), jnp.float32), jnp.arange(nk, dtype=jnp.int32))
  dk_BxHxSxK = dk_NxBxHxCxK.transpose(1, 2, 0, 3, 4).reshape(B, H, Sp, K)
  dv_BxHxSxK = dv_NxBxHxCxK.transpose(1, 2, 0, 3, 4).reshape(B, H, Sp, K)
  return (dq_BxHxTxK.astype(q_BxHxTxK.dtype), dk_BxHxSxK.astype(k_BxHxSxK.dtype),
          dv_BxHxSxK.astype(v_BxHxSxK.dtype), dz_BxHxT, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

# checkpoint_name()s of the chunked forward's outputs. `remat_policy` saves them, so a remat'd layer
# keeps these O(T) residuals instead of re-running the forward loop in the backward pass.
SAVED_NAMES = ("zero_slot_attention_out", "zero_slot_attention_lse", "zero_slot_attention_a0")
