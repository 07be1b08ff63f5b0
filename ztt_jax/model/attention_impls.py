"""Implementations of zero-slot attention behind `model.attention_impl`.

All of them compute, per batch row b, head h and query t at absolute position pos[t]:

  s[t, s] = scale * q[t] . k[s]                       for keys s <= pos[t]  (scale = 1/sqrt(K))
  z[t]    = scale * q[t] . zero_key + zero_bias       the zero slot's logit (-inf when masked)
  L[t]    = log(exp(z[t]) + sum_s exp(s[t, s]))       log-sum-exp over the zero slot and the keys
  a0[t]   = exp(z[t] - L[t])                          softmax mass on the zero slot
  out[t]  = sum_s exp(s[t, s] - L[t]) v[s]            the zero slot's value is 0

reference
  `reference_attention`: the [B, H, T, S] scores and probabilities written out; the oracle.

chunked (pure JAX, every backend)
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

  Remat: under jax.checkpoint a layer saves only what its policy allows, and the forward's loop
  outputs are not dots, so dots_with_no_batch_dims_saveable alone re-runs the whole blockwise
  forward inside the backward just to rebuild out/L/a0. The forward names them (SAVED_NAMES) and
  `remat_policy(name)` adds them to the policy: the layer then keeps O(T) residuals per layer and
  the forward runs once (tests: test_remat_policy_keeps_the_chunked_residuals).

cudnn (GPU) and pallas (TPU): one exact construction on a standard causal flash kernel
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
  cuDNN needs bf16/fp16 inputs and Kp <= 128 (<= 256 from Hopper on); pallas pads T+1 to a multiple
  of 128 (padded keys sit after every real query, so the causal mask hides them) and uses the largest
  of 512/256/128 that divides it as block. Possible refinement on TPU: splash attention with
  CausalMask(offset=1) over [zero key; keys] needs no dummy query row (not done: untested here).
  These kernels cover the training / full-sequence case (queries are the keys, positions 0..T-1).
  Calls with query positions (decoding against a KV cache, T != S) go to `chunked`, whose
  dynamic trip counts also skip the unwritten tail of the cache.
  Numerics on the devices are checked by benchmarks/gpu.sh through `check_against_reference`; on
  CPU the tests run the same construction through jax.nn.dot_product_attention(implementation='xla')
  and (opt-in, ~30 s: ZTT_TEST_PALLAS_INTERPRET=1) the Pallas TPU kernel in interpret mode.

auto (the default)
  GPU: cudnn where supported (bf16/fp16, head dim), else chunked. TPU: pallas. CPU: chunked, which
  measured at least as fast as reference from T=64 on (`CPU_CHUNKED_MIN_LEN` has the figures).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ztt_jax.errors import ConfigError
from ztt_jax.model.config import ATTENTION_IMPLS

Array = jax.Array

# CPU, `auto`: below this many keys the dense reference runs, from here on chunked. 0: chunked
# always, since chunked was >= 0.95x the reference's train-step speed everywhere measured.
# Train steps of configs/text.py:ztt (d128, 4 heads, 4 layers x 3 cycles, AdamW, float32, block
# 128), min over interleaved repeats, 2-core machine with load ~0 (uptime 0.02-1.4):
#   T=64 (batch 12): chunked 0.97x reference;  T=256 (batch 4): 1.29x (1.35x with the residuals
#   kept under remat, `remat_policy`);  T=2048 (batch 4): 1.52x.
# Under load 9-19 (shared machine) the same runs gave 1.01x, 0.94-1.58x and 2.46x: noise, same sign.
# Attention alone (fwd+bwd, B4 H4 K32, loaded): T=256 0.0051 s vs 0.0066 s; T=2048 0.22 s vs 2.0 s.
CPU_CHUNKED_MIN_LEN = 0

# attention_block_size=0: CPU keeps a [B,H,128,128] float32 block in cache (block 512 was 4x slower
# than 128 at T=2048 there); accelerators want fewer, larger loop iterations.
DEFAULT_BLOCK = {"cpu": 128}
DEFAULT_BLOCK_OTHER = 512

_NEG_BIG = -1e9  # the masked zero slot's logit in the fused construction (exp underflows to 0)


# ---------------------------------------------------------------- reference

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
  causal_TxS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :] if valid_TxS is None else valid_TxS
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


# ---------------------------------------------------------------- chunked

def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block(n: int, block: int) -> int:
  # A length that fits in one block is its own block: no padding, one iteration.
  return n if n <= block else block


def chunked_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                      zero_key_HxK: Optional[Array] = None, zero_bias_H: Optional[Array] = None,
                      mask_zero_slot: Optional[Array] = None, *, q_positions_T: Optional[Array] = None,
                      block_size: int = 0) -> tuple[Array, Array]:
  """Blockwise online-softmax zero-slot attention with a flash-style custom VJP (module docstring).

  q_positions_T: absolute (non-decreasing) positions of the queries; key s sits at position s.
    Default: the queries are the last T of the S keys.
  block_size: query and key block; 0 = the backend's default (DEFAULT_BLOCK).
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
    block_size = DEFAULT_BLOCK.get(_backend(), DEFAULT_BLOCK_OTHER)
  bq, bk = _block(T, block_size), _block(S, block_size)
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  # [B, H, T, K]: each block is then a contiguous slice for the batched matmuls.
  q_BxHxTxK = jnp.pad(q_BxTxHxK.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  k_BxHxSxK = jnp.pad(k_BxSxHxK.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  v_BxHxSxK = jnp.pad(v_BxSxHxK.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  zp_BxHxT = jnp.pad(z_BxHxT, ((0, 0), (0, 0), (0, Tp - T)), constant_values=-jnp.inf)
  # Padded queries repeat the last position: they see keys (finite softmax) and skip nothing extra.
  # Padded keys sit at positions >= S > every query position, so the causal test hides them.
  posp_T = jnp.pad(pos_T, (0, Tp - T), mode="edge")
  out_BxHxTxK, a0_BxHxT = _flash(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, zp_BxHxT, posp_T, bq, bk, scale)
  return out_BxHxTxK[:, :, :T].transpose(0, 2, 1, 3), a0_BxHxT[:, :, :T]


def _scores(q_BxHxQxK, k_BxHxCxK, qpos_Q, k0, scale):
  """Masked float32 scores of one (query block, key block) pair; keys start at position k0."""
  s_BxHxQxC = jnp.einsum("bhqk,bhck->bhqc", q_BxHxQxK, k_BxHxCxK, preferred_element_type=jnp.float32) * scale
  kpos_C = k0 + jnp.arange(k_BxHxCxK.shape[2], dtype=jnp.int32)
  return jnp.where((kpos_C[None, :] <= qpos_Q[:, None])[None, None], s_BxHxQxC, -jnp.inf)


def _flash_forward(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, bq, bk, scale):
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

    def key_block(j, carry):
      m_BxHxQ, l_BxHxQ, acc_BxHxQxK = carry
      k_BxHxCxK = jax.lax.dynamic_slice_in_dim(k_BxHxSxK, j * bk, bk, axis=2)
      v_BxHxCxK = jax.lax.dynamic_slice_in_dim(v_BxHxSxK, j * bk, bk, axis=2)
      s_BxHxQxC = _scores(q_BxHxQxK, k_BxHxCxK, pos_Q, j * bk, scale)
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

    m_BxHxQ, l_BxHxQ, acc_BxHxQxK = jax.lax.fori_loop(0, n_visible, key_block,
                                                      (m_BxHxQ, l_BxHxQ, acc_BxHxQxK))
    out_BxHxQxK = (acc_BxHxQxK / l_BxHxQ[..., None]).astype(v_BxHxSxK.dtype)
    # a0 = exp(z - m) / l rather than exp(z - lse): one rounding fewer, as the reference computes it.
    a0_BxHxQ = jnp.exp(z_BxHxQ - m_BxHxQ) / l_BxHxQ
    return out_BxHxQxK, m_BxHxQ + jnp.log(l_BxHxQ), a0_BxHxQ

  out_NxBxHxQxK, lse_NxBxHxQ, a0_NxBxHxQ = jax.lax.map(query_block, (q_NxBxHxQxK, z_NxBxHxQ, pos_NxQ))
  out_BxHxTxK = out_NxBxHxQxK.transpose(1, 2, 0, 3, 4).reshape(B, H, Tp, K)
  unblock = lambda x_NxBxHxQ: x_NxBxHxQ.transpose(1, 2, 0, 3).reshape(B, H, Tp)
  return out_BxHxTxK, unblock(lse_NxBxHxQ), unblock(a0_NxBxHxQ)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, bq, bk, scale):
  out_BxHxTxK, _, a0_BxHxT = _flash_forward(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, bq, bk, scale)
  return out_BxHxTxK, a0_BxHxT


def _flash_fwd(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, bq, bk, scale):
  out_BxHxTxK, lse_BxHxT, a0_BxHxT = _flash_forward(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, z_BxHxT, pos_T, bq, bk,
                                                    scale)
  # Named so a remat policy can keep them (`SAVED_NAMES`) instead of re-running the forward loop.
  out_BxHxTxK = checkpoint_name(out_BxHxTxK, "zero_slot_attention_out")
  lse_BxHxT = checkpoint_name(lse_BxHxT, "zero_slot_attention_lse")
  a0_BxHxT = checkpoint_name(a0_BxHxT, "zero_slot_attention_a0")
  return (out_BxHxTxK, a0_BxHxT), (q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, pos_T, out_BxHxTxK, lse_BxHxT, a0_BxHxT)


def _flash_bwd(bq, bk, scale, res, cotangents):
  q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, pos_T, out_BxHxTxK, lse_BxHxT, a0_BxHxT = res
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

  def key_block(dq_BxHxTxK, j):
    k_BxHxCxK = jax.lax.dynamic_slice_in_dim(k_BxHxSxK, j * bk, bk, axis=2)
    v_BxHxCxK = jax.lax.dynamic_slice_in_dim(v_BxHxSxK, j * bk, bk, axis=2)
    first_q = jnp.sum(last_pos_N < j * bk)  # earlier query blocks cannot see this key block

    def query_block(i, carry):
      dq_BxHxTxK, dk_BxHxCxK, dv_BxHxCxK = carry
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)
      q_BxHxQxK, do_BxHxQxK, lse_BxHxQ, d_BxHxQ = sl(q_BxHxTxK), sl(do_BxHxTxK), sl(lse_BxHxT), sl(d_BxHxT)
      pos_Q = jax.lax.dynamic_slice_in_dim(pos_T, i * bq, bq)
      s_BxHxQxC = _scores(q_BxHxQxK, k_BxHxCxK, pos_Q, j * bk, scale)
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
    dq_BxHxTxK, dk_BxHxCxK, dv_BxHxCxK = jax.lax.fori_loop(first_q, nq, query_block,
                                                           (dq_BxHxTxK, zeros_BxHxCxK, zeros_BxHxCxK))
    return dq_BxHxTxK, (dk_BxHxCxK, dv_BxHxCxK)

  dq_BxHxTxK, (dk_NxBxHxCxK, dv_NxBxHxCxK) = jax.lax.scan(
      key_block, jnp.zeros((B, H, Tp, K), jnp.float32), jnp.arange(nk, dtype=jnp.int32))
  dk_BxHxSxK = dk_NxBxHxCxK.transpose(1, 2, 0, 3, 4).reshape(B, H, Sp, K)
  dv_BxHxSxK = dv_NxBxHxCxK.transpose(1, 2, 0, 3, 4).reshape(B, H, Sp, K)
  return (dq_BxHxTxK.astype(q_BxHxTxK.dtype), dk_BxHxSxK.astype(k_BxHxSxK.dtype),
          dv_BxHxSxK.astype(v_BxHxSxK.dtype), dz_BxHxT, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

# checkpoint_name()s of the chunked forward's outputs. `remat_policy` saves them, so a remat'd layer
# keeps these O(T) residuals instead of re-running the forward loop in the backward pass.
SAVED_NAMES = ("zero_slot_attention_out", "zero_slot_attention_lse", "zero_slot_attention_a0")


# ---------------------------------------------------------------- fused kernels (cudnn / pallas)

def augment_for_causal_kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H=None,
                              mask_zero_slot=None, multiple: int = 8):
  """The dummy-query / zero-key-row construction of the module docstring.

  Returns (q, k, v) [B, T+1, H, Kp] in q's dtype, Kp = round_up(K + 2, multiple).
  """
  B, T, H, K = q_BxTxHxK.shape
  S = k_BxSxHxK.shape[1]
  dt = q_BxTxHxK.dtype
  Kp = _round_up(K + 2, multiple)
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
                    mask_zero_slot=None, multiple: int = 8) -> tuple[Array, Array]:
  """Zero-slot attention through `kernel(q, k, v, scale) -> out`, a causal (top-left) attention on
  [B, T, H, K] inputs with its own VJP. Training case only: T == S, positions 0..T-1."""
  B, T, H, K = q_BxTxHxK.shape
  scale = 1.0 / math.sqrt(K)
  if zero_key_HxK is None:
    out_BxTxHxK = kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale)
    return out_BxTxHxK.astype(v_BxSxHxK.dtype), jnp.zeros((B, H, T), jnp.float32)
  q_aug, k_aug, v_aug = augment_for_causal_kernel(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H,
                                                  mask_zero_slot, multiple)
  o_aug = kernel(q_aug, k_aug, v_aug, scale)
  out_BxTxHxK = o_aug[:, 1:, :, :K].astype(v_BxSxHxK.dtype)
  a0_BxHxT = o_aug[:, 1:, :, K].astype(jnp.float32).transpose(0, 2, 1)
  return out_BxTxHxK, a0_BxHxT


def cudnn_kernel(q, k, v, scale):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")


def xla_kernel(q, k, v, scale):
  """jax.nn.dot_product_attention's XLA path: the same API and mask as cudnn, on any backend (tests)."""
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")


def pallas_kernel(q, k, v, scale, block: int = 512):
  """The Pallas TPU flash kernel on [B, T, H, K]; pads T to a multiple of 128 at the end (the
  causal mask keeps the padded keys from every real query). Runs on CPU under
  jax.experimental.pallas.tpu.force_tpu_interpret_mode()."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only kernel: lazy
  B, T, H, K = q.shape
  Tp = _round_up(T, 128)
  blk = next(b for b in (block, 256, 128) if b <= Tp and Tp % b == 0)
  sizes = tpu_flash.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
                               block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk, block_q_dkv=blk,
                               block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
  to_bhtk = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  o = tpu_flash.flash_attention(to_bhtk(q), to_bhtk(k), to_bhtk(v), causal=True, sm_scale=scale,
                                block_sizes=sizes)
  return o[:, :, :T].transpose(0, 2, 1, 3)


# ---------------------------------------------------------------- choice of implementation

def _backend() -> str:
  return jax.default_backend()


def _cudnn_problem(dtype, head_dim: int, zero_slot: bool) -> Optional[str]:
  """Why cuDNN flash attention cannot run this call, or None."""
  if _backend() != "gpu":
    return f"needs a CUDA GPU (the default backend is {_backend()!r})"
  try:
    kind = jax.devices()[0].compute_capability  # e.g. '9.0'
    hopper = tuple(int(x) for x in str(kind).split(".")) >= (9, 0)
  except Exception:  # ROCm or a device without the attribute: cuDNN is CUDA only
    return "needs an NVIDIA GPU with cuDNN"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name} (set model.dtype=bfloat16)"
  kp = _round_up(head_dim + 2, 8) if zero_slot else head_dim
  limit = 256 if hopper else 128
  if kp > limit or kp % 8:
    return (f"supports head dims that are multiples of 8 up to {limit} on this GPU; the zero slot "
            f"needs {kp} for head_dim={head_dim}")
  return None


def _pallas_problem() -> Optional[str]:
  if _backend() != "tpu":
    return f"needs a TPU (the default backend is {_backend()!r})"
  return None


def resolve(impl: str, *, seq_len: int, dtype, head_dim: int, zero_slot: bool = True) -> str:
  """The implementation `impl` means for one call on this backend: reference | chunked | cudnn | pallas.

  Raises ConfigError when an explicitly requested fused kernel cannot run here."""
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl={impl!r}: unknown; use one of {', '.join(ATTENTION_IMPLS)}")
  if impl == "cudnn":
    problem = _cudnn_problem(dtype, head_dim, zero_slot)
    if problem:
      raise ConfigError(f"model.attention_impl='cudnn' {problem}; use model.attention_impl=auto (picks what "
                        "this machine supports) or chunked (any backend)")
  elif impl == "pallas":
    problem = _pallas_problem()
    if problem:
      raise ConfigError(f"model.attention_impl='pallas' {problem}; use model.attention_impl=auto or chunked")
  if impl != "auto":
    return impl
  backend = _backend()
  if backend == "gpu":
    return "chunked" if _cudnn_problem(dtype, head_dim, zero_slot) else "cudnn"
  if backend == "tpu":
    return "pallas"
  return "chunked" if seq_len >= CPU_CHUNKED_MIN_LEN else "reference"


def attention(impl: str, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK=None, zero_bias_H=None,
              mask_zero_slot=None, *, q_positions_T=None, valid_TxS=None, block_size: int = 0):
  """Dispatch to one implementation (see `ztt_jax.model.attention.zero_slot_attention`)."""
  T, S = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
  K = q_BxTxHxK.shape[-1]
  name = resolve(impl, seq_len=S, dtype=q_BxTxHxK.dtype, head_dim=K, zero_slot=zero_key_HxK is not None)
  args = (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, zero_key_HxK, zero_bias_H, mask_zero_slot)
  if valid_TxS is not None or name == "reference":
    if valid_TxS is None and q_positions_T is not None:
      valid_TxS = jnp.arange(S)[None, :] <= jnp.asarray(q_positions_T)[:, None]
    return reference_attention(*args, valid_TxS=valid_TxS)
  if name in ("cudnn", "pallas") and q_positions_T is None and T == S:
    kernel = cudnn_kernel if name == "cudnn" else pallas_kernel
    return fused_attention(kernel, *args)
  # Decoding (query positions against a cache) and everything else: chunked.
  return chunked_attention(*args, q_positions_T=q_positions_T, block_size=block_size)


# ---------------------------------------------------------------- device check

def check_against_reference(impl: str, *, batch: int = 2, seq_len: int = 1024, num_heads: int = 4,
                            head_dim: int = 64, dtype: str = "bfloat16", zero_bias: bool = True,
                            block_size: int = 0, seed: int = 0) -> dict:
  """Max |impl - reference| of out, a0 and the gradients (q, k, v, zero key, zero bias) on random
  inputs, on the default backend; the reference runs in float32 on the same (rounded) inputs.

  For benchmarks/gpu.sh: `python -c "from ztt_jax.model.attention_impls import
  check_against_reference as c; print(c('cudnn'))"`. Also returns the resolved implementation and
  the errors of `chunked` in the same dtype, as a yardstick for what the dtype's rounding costs.
  """
  dt = jnp.dtype(dtype)
  B, T, H, K = batch, seq_len, num_heads, head_dim
  r = jax.random.split(jax.random.key(seed), 6)
  q, k, v = (jax.random.normal(r[i], (B, T, H, K), jnp.float32).astype(dt) for i in range(3))
  zk = (2.0 * jax.random.normal(r[3], (H, K), jnp.float32)).astype(dt)
  zb = jax.random.normal(r[4], (H,), jnp.float32) if zero_bias else None
  w_out = jax.random.normal(r[5], (B, T, H, K), jnp.float32)

  def loss(fn, q, k, v, zk, zb):
    out, a0 = fn(q, k, v, zk, zb)
    return jnp.sum(out.astype(jnp.float32) * w_out) + 3.0 * jnp.sum(a0 * jnp.arange(T) / T)

  def run(name, cast):
    fn = lambda q, k, v, zk, zb: attention(name, *(x.astype(cast) for x in (q, k, v, zk)), zb,
                                           block_size=block_size)
    f = jax.jit(lambda *a: (fn(*a), jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4))(*a)))
    (out, a0), grads = f(q, k, v, zk, zb if zb is not None else jnp.zeros((H,)))
    return out.astype(jnp.float32), a0, [g.astype(jnp.float32) for g in grads]

  ref = run("reference", jnp.float32)

  def errors(got):
    names = ("dq", "dk", "dv", "dzero_key", "dzero_bias")
    e = {"out": float(jnp.max(jnp.abs(got[0] - ref[0]))), "a0": float(jnp.max(jnp.abs(got[1] - ref[1])))}
    e.update({n: float(jnp.max(jnp.abs(g - gr))) for n, g, gr in zip(names, got[2], ref[2])})
    return e

  resolved = resolve(impl, seq_len=T, dtype=dt, head_dim=K)
  return {"impl": impl, "resolved": resolved, "backend": _backend(), "dtype": dt.name,
          "shape": [B, T, H, K], "errors": errors(run(impl, dt)), "chunked_errors": errors(run("chunked", dt))}


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
