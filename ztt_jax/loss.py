"""Per-token cross-entropy of the LM head that never holds the [tokens, vocab] logits.

The head matmul, the log-softmax and the target's logit run over blocks of positions inside a scan,
with a custom VJP whose backward pass recomputes each block's logits from the hidden states and the
per-token log-sum-exp saved by the forward pass (Levanter's blockwise loss, Liger's fused linear
cross-entropy). Peak memory grows with the block (tokens x vocab), not with the sequence; at a 50k
vocabulary the float32 logits of one 8 x 1024 batch are 1.6 GiB, and deep supervision held C of them.

The vocabulary is not tiled: a block's logits are [M, block, V] with M sequences, and
`positions_per_block` keeps them near AUTO_BLOCK_ELEMENTS floats unless a block size is given.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

AUTO_BLOCK_ELEMENTS = 2**25
"""block_tokens=0: a block holds about this many logits (128 MiB in float32, over all devices)."""


class LMHead(NamedTuple):
  """The LM head's kernel in the compute dtype: the tied embedding [V, D] (vocab_axis 0) or the
  untied lm_head [D, V] (vocab_axis 1). Kept in its own layout: transposing would copy V x D."""
  kernel: Array
  vocab_axis: int

  @property
  def vocab_size(self) -> int:
    return self.kernel.shape[self.vocab_axis]


def head_logits(h_BxTxD: Array, head: LMHead) -> Array:
  """float32 logits [B, T, V] (the matmul accumulates in float32 whatever the compute dtype)."""
  spec = "vd" if head.vocab_axis == 0 else "dv"
  logits_BxTxV = jnp.einsum(f"btd,{spec}->btv", h_BxTxD, head.kernel, preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "vocab"))


def positions_per_block(B: int, T: int, V: int, block_tokens: int = 0) -> int:
  """Positions per block for B sequences of T tokens: block_tokens tokens in all (0: about
  AUTO_BLOCK_ELEMENTS logits), a divisor of T when one is at least half that size (no padding)."""
  tokens = block_tokens if block_tokens > 0 else max(1, AUTO_BLOCK_ELEMENTS // V)
  tb = max(1, min(T, tokens // B))
  divisor = max(d for d in range(1, tb + 1) if T % d == 0)
  if 2 * divisor > tb:
    return divisor
  return math.ceil(T / math.ceil(T / tb))  # as even as possible; the last block is padded


def token_losses(h_xBxTxD: Array, head: LMHead, targets_BxT: Array, block_tokens: int = 0) -> tuple[Array, Array]:
  """(cross-entropy float32, argmax == target bool), each of shape h.shape[:-1].

  h_xBxTxD: the hidden states the head reads (after the final norm), [B, T, D] or with leading dims
  [..., B, T, D] (e.g. per-cycle states [C, B, T, D]), all scored against the same targets [B, T].
  block_tokens: tokens per block of the batch (0: automatic, see positions_per_block); the blocks
  split the sequence, never the batch, so a batch sharded over devices stays where it is.
  Differentiable in h and the head's kernel (the hit has no gradient)."""
  lead, (B, T, D) = h_xBxTxD.shape[:-3], h_xBxTxD.shape[-3:]
  if targets_BxT.shape != (B, T):
    raise ValueError(f"targets {targets_BxT.shape} do not match the hidden states' [B, T] = {(B, T)}")
  h_LxBxTxD = h_xBxTxD.reshape((math.prod(lead), B, T, D))
  targets_BxT = targets_BxT.astype(jnp.int32)
  L = h_LxBxTxD.shape[0]
  if block_tokens == 0 and L * B * T * head.vocab_size <= AUTO_BLOCK_ELEMENTS:
    ce, hit = _whole(h_LxBxTxD, head, targets_BxT)
    return ce.reshape(lead + (B, T)), hit.reshape(lead + (B, T))
  tb = positions_per_block(B, T, head.vocab_size, block_tokens)
  pad = -T % tb
  if pad:
    h_LxBxTxD = jnp.pad(h_LxBxTxD, ((0, 0), (0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  ce, hit = _blockwise(h_LxBxTxD, head.kernel, targets_BxT, tb, head.vocab_axis)
  return ce[..., :T].reshape(lead + (B, T)), hit[..., :T].reshape(lead + (B, T))


def _whole(h_LxBxTxD: Array, head: LMHead, targets_BxT: Array) -> tuple[Array, Array]:
  """All logits at once, differentiated by JAX: where they fit in one automatic block (small
  vocabularies, the embedded tasks) the scans and the custom VJP would only cost compile time."""
  L, B, T, D = h_LxBxTxD.shape
  logits = head_logits(h_LxBxTxD.reshape(L * B, T, D), head).reshape(L, B, T, -1)
  picked = jnp.take_along_axis(logits, targets_BxT[None, ..., None], axis=-1)[..., 0]
  hit = jnp.argmax(logits, axis=-1) == targets_BxT[None]
  return jax.nn.logsumexp(logits, axis=-1) - picked, hit


def _blocks(h_LxBxTxD: Array, tb: int) -> tuple[int, Array, Array]:
  """Number of blocks per row of h, and each scan step's (row, first position)."""
  L, n = h_LxBxTxD.shape[0], h_LxBxTxD.shape[2] // tb
  k = jnp.arange(L * n, dtype=jnp.int32)
  return n, k // n, (k % n) * tb


def _block(h_LxBxTxD, kernel, targets_BxT, l, t0, tb, vocab_axis):
  """One block: its hidden states [B, tb, D], targets [B, tb] and float32 logits [B, tb, V]."""
  h_blk = jax.lax.dynamic_slice_in_dim(h_LxBxTxD[l], t0, tb, axis=1)
  t_blk = jax.lax.dynamic_slice_in_dim(targets_BxT, t0, tb, axis=1)
  return h_blk, t_blk, head_logits(h_blk, LMHead(kernel, vocab_axis))


def _forward(h_LxBxTxD, kernel, targets_BxT, tb, vocab_axis):
  """(ce, hit, log-sum-exp), each [L, B, T]."""
  def body(_, xs):
    _, t_blk, logits = _block(h_LxBxTxD, kernel, targets_BxT, *xs, tb, vocab_axis)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t_blk[..., None], axis=-1)[..., 0]
    return None, (lse - picked, jnp.argmax(logits, axis=-1) == t_blk, lse)

  n, l_K, t0_K = _blocks(h_LxBxTxD, tb)
  _, ys = jax.lax.scan(body, None, (l_K, t0_K))
  L, B, T = h_LxBxTxD.shape[:3]
  # [L * n, B, tb] -> [L, B, T]: small arrays, one transpose each.
  return tuple(y.reshape(L, n, B, tb).transpose(0, 2, 1, 3).reshape(L, B, T) for y in ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(h_LxBxTxD, kernel, targets_BxT, tb: int, vocab_axis: int):
  ce, hit, _ = _forward(h_LxBxTxD, kernel, targets_BxT, tb, vocab_axis)
  return ce, hit


def _blockwise_fwd(h_LxBxTxD, kernel, targets_BxT, tb, vocab_axis):
  ce, hit, lse = _forward(h_LxBxTxD, kernel, targets_BxT, tb, vocab_axis)
  return (ce, hit), (h_LxBxTxD, kernel, targets_BxT, lse)


def _blockwise_bwd(tb, vocab_axis, res, cotangents):
  """d ce / d logits = (softmax - onehot(target)) g, block by block from the saved log-sum-exp."""
  h_LxBxTxD, kernel, targets_BxT, lse_LxBxT = res
  g_LxBxT = cotangents[0].astype(jnp.float32)  # the hit is boolean: no cotangent
  spec = "vd" if vocab_axis == 0 else "dv"
  kernel_axes = ("vocab", "embed") if vocab_axis == 0 else ("embed", "vocab")

  def body(carry, xs):
    dh_LxBxTxD, dkernel = carry
    l, t0 = xs
    h_blk, t_blk, logits = _block(h_LxBxTxD, kernel, targets_BxT, l, t0, tb, vocab_axis)
    lse = jax.lax.dynamic_slice_in_dim(lse_LxBxT[l], t0, tb, axis=1)
    g = jax.lax.dynamic_slice_in_dim(g_LxBxT[l], t0, tb, axis=1)
    onehot = jax.nn.one_hot(t_blk, logits.shape[-1], dtype=jnp.float32)
    dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * g[..., None]).astype(kernel.dtype)
    dh_blk = jnp.einsum(f"btv,{spec}->btd", dlogits, kernel, preferred_element_type=jnp.float32)
    dkernel = dkernel + jnp.einsum(f"btv,btd->{spec}", dlogits, h_blk, preferred_element_type=jnp.float32)
    dkernel = nn.with_logical_constraint(dkernel, kernel_axes)
    dh_LxBxTxD = jax.lax.dynamic_update_slice(dh_LxBxTxD, dh_blk.astype(h_LxBxTxD.dtype)[None], (l, 0, t0, 0))
    return (dh_LxBxTxD, dkernel), None

  _, l_K, t0_K = _blocks(h_LxBxTxD, tb)
  zeros = (jnp.zeros_like(h_LxBxTxD), jnp.zeros(kernel.shape, jnp.float32))
  (dh_LxBxTxD, dkernel), _ = jax.lax.scan(body, zeros, (l_K, t0_K))
  return dh_LxBxTxD, dkernel.astype(kernel.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
