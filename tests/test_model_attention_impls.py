"""model.attention_impl: chunked (and the fused-kernel construction) against the dense reference.

Function level: out to 2e-5, a0 to 1e-6, gradients of q, k, v, zero key and zero bias to 1e-4, on
lengths that are not multiples of the block, with decoding positions, zero bias and a masked slot.
Model level: ZTTModel logits and all param gradients, per-token exit, bfloat16, cached decoding.
Memory: the chunked backward's jaxpr holds no array with both a query and a key length axis.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ztt_jax.errors import ConfigError
from ztt_jax.model import attention_impls as ai
from ztt_jax.model.config import ModelConfig

GRAD_NAMES = ("q", "k", "v", "zero_key", "zero_bias")


def _inputs(B, T, S, H, K, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(B, n, H, K)), dtype) for n in (T, S, S))
  zk = jnp.asarray(2.0 * r.normal(size=(H, K)), dtype)  # a0 takes real, varied weight
  zb = jnp.asarray(r.normal(size=(H,)), jnp.float32)
  w_out = jnp.asarray(r.normal(size=(B, T, H, K)), jnp.float32)
  w_a0 = jnp.asarray(r.normal(size=(B, H, T)), jnp.float32)
  return (q, k, v, zk, zb), (w_out, w_a0)


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl, block, with_positions, mask):
  """jit of (out, a0, grads of a loss on out and a0 w.r.t. q, k, v, zero key, zero bias)."""
  def f(args, weights, pos):
    def loss(*a):
      out, a0 = ai.attention(impl, *a, None if mask is None else jnp.asarray(mask),
                             q_positions_T=pos if with_positions else None, block_size=block)
      return jnp.sum(out.astype(jnp.float32) * weights[0]) + jnp.sum(a0 * weights[1]), (out, a0)
    (_, (out, a0)), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(*args)
    return out, a0, grads
  return jax.jit(f)


def _compare(got, ref, out_tol=2e-5, a0_tol=1e-6, grad_tol=1e-4):
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32), atol=out_tol, rtol=0)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), atol=a0_tol, rtol=0)
  for name, g, gr in zip(GRAD_NAMES, got[2], ref[2]):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(gr, np.float32), atol=grad_tol, rtol=0,
                               err_msg=f"d{name}")


# (B, T, S, block, positions): causal training lengths around the block, a key length longer than
# the queries (queries are the last T keys), and decoding (a prefill and a one-token step against a
# cache whose tail is unwritten).
CASES = [
    (2, 21, 21, 8, None),    # 3 blocks, the last one padded; several fully-masked blocks skipped
    (1, 16, 16, 8, None),    # exact multiple of the block
    (2, 5, 21, 8, None),     # T < S: queries at positions 16..20
    (2, 5, 21, 8, "decode"),   # prefill of 5 tokens at offset 3 into a 21-slot cache
    (1, 1, 21, 8, "decode"),   # one decoding step
    (2, 21, 21, 512, None),  # one block (the default block size at a short length)
]


@pytest.mark.parametrize("B,T,S,block,positions", CASES)
def test_chunked_matches_reference(B, T, S, block, positions):
  args, weights = _inputs(B, T, S, 3, 8, seed=T + S)
  pos = jnp.arange(T, dtype=jnp.int32) + (3 if T > 1 else 11)
  ref = _value_and_grads("reference", block, positions is not None, None)(args, weights, pos)
  got = _value_and_grads("chunked", block, positions is not None, None)(args, weights, pos)
  _compare(got, ref)
  a0 = np.asarray(ref[1])
  assert a0.max() > 0.3 and a0.std() > 0.05  # the slot takes real, varied weight
  assert float(jnp.abs(ref[2][3]).max()) > 1e-2 and float(jnp.abs(ref[2][4]).max()) > 1e-2


def test_masked_slot_and_no_zero_key():
  args, weights = _inputs(2, 13, 13, 2, 8, seed=3)
  pos = jnp.arange(13, dtype=jnp.int32)
  ref = _value_and_grads("reference", 4, False, True)(args, weights, pos)
  got = _value_and_grads("chunked", 4, False, True)(args, weights, pos)
  _compare(got, ref)
  assert float(jnp.abs(got[1]).max()) == 0.0
  assert float(jnp.abs(got[2][3]).max()) == 0.0 and float(jnp.abs(got[2][4]).max()) == 0.0
  q, k, v = args[:3]
  out, a0 = ai.attention("chunked", q, k, v, block_size=4)
  out_ref, _ = ai.attention("reference", q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=2e-5)
  assert float(jnp.abs(a0).max()) == 0.0


def test_fused_construction_is_exact_through_a_standard_causal_kernel():
  """The cudnn/pallas construction (dummy query, zero-key row, a0 channel) run through
  jax.nn.dot_product_attention's XLA path, which has cudnn's API and (top-left causal) mask."""
  args, weights = _inputs(2, 11, 11, 3, 8, seed=5)
  for mask in (None, True):
    m = None if mask is None else jnp.asarray(mask)

    def loss(fn, *a):
      out, a0 = fn(*a, m)
      return jnp.sum(out * weights[0]) + jnp.sum(a0 * weights[1]), (out, a0)

    got_fn = functools.partial(ai.fused_attention, ai.xla_kernel)
    ref_fn = functools.partial(ai.attention, "reference")
    results = []
    for fn in (got_fn, ref_fn):
      (_, (out, a0)), grads = jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=range(5),
                                                         has_aux=True))(*args)
      results.append((out, a0, grads))
    _compare(*results)


@pytest.mark.skipif(not os.environ.get("ZTT_TEST_PALLAS_INTERPRET"),
                    reason="~30 s: the Pallas TPU kernel in interpret mode; set ZTT_TEST_PALLAS_INTERPRET=1")
def test_pallas_construction_in_interpret_mode():
  from jax.experimental.pallas import tpu as pltpu
  args, weights = _inputs(1, 20, 20, 1, 8, seed=6)

  def loss(fn, *a):
    out, a0 = fn(*a)
    return jnp.sum(out * weights[0]) + jnp.sum(a0 * weights[1]), (out, a0)

  results = []
  with pltpu.force_tpu_interpret_mode():
    for fn in (functools.partial(ai.fused_attention, ai.pallas_kernel), functools.partial(ai.attention, "reference")):
      (_, (out, a0)), grads = jax.value_and_grad(functools.partial(loss, fn), argnums=range(5), has_aux=True)(*args)
      results.append((out, a0, grads))
  _compare(*results)


def _avals(jaxpr, acc):
  """Shapes of every value in a jaxpr and its sub-jaxprs (scan/while/cond/custom_vjp bodies)."""
  from jax._src import core
  for eqn in jaxpr.eqns:
    acc.extend(tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape"))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else (p,)):
        if isinstance(sub, core.ClosedJaxpr):
          _avals(sub.jaxpr, acc)
        elif isinstance(sub, core.Jaxpr):
          _avals(sub, acc)
  return acc


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_backward_holds_no_query_by_key_array(impl):
  """Query and key lengths (T=24, S=40) and block 8 are distinct from every other size, so an
  array with both a T and an S axis is a materialised score or probability matrix."""
  B, T, S, H, K = 1, 24, 40, 3, 4
  args, weights = _inputs(B, T, S, H, K)

  def loss(*a):
    out, a0 = ai.attention(impl, *a, block_size=8)
    return jnp.sum(out * weights[0]) + jnp.sum(a0 * weights[1])

  shapes = _avals(jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(*args).jaxpr, [])
  dense = [s for s in shapes if T in s and S in s]
  if impl == "reference":
    assert dense, "the detector must see the reference's [B,H,T,S] scores"
  else:
    assert not dense, f"chunked materialised query x key arrays: {sorted(set(dense))}"
    assert any(8 in s for s in shapes)  # it did run blockwise


def test_remat_policy_keeps_the_chunked_residuals():
  """Under the layer remat policy the forward loop runs once, not again inside the backward."""
  args, weights = _inputs(1, 16, 16, 2, 4)

  def loss(*a):
    out, a0 = ai.attention("chunked", *a, block_size=8)
    return jnp.sum(out * weights[0]) + jnp.sum(a0 * weights[1])

  def n_loops(policy):
    f = loss if policy is None else jax.checkpoint(loss, policy=policy)
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=range(5)))(*args).jaxpr
    return str(jaxpr).count("while[") + str(jaxpr).count("scan[")

  plain = n_loops(None)
  assert n_loops(ai.remat_policy("dots_with_no_batch_dims_saveable")) == plain
  assert n_loops(jax.checkpoint_policies.dots_with_no_batch_dims_saveable) > plain  # what it avoids


def test_impl_choice_and_errors_name_the_fix():
  assert jax.default_backend() == "cpu"
  # Measured on CPU: chunked is at least as fast from T=64 on (attention_impls.CPU_CHUNKED_MIN_LEN).
  assert ai.resolve("auto", seq_len=64, dtype=jnp.float32, head_dim=32) == "chunked"
  assert ai.resolve("chunked", seq_len=64, dtype=jnp.float32, head_dim=32) == "chunked"
  for impl, needs in (("cudnn", "CUDA GPU"), ("pallas", "TPU")):
    with pytest.raises(ConfigError, match=f"attention_impl='{impl}' needs a {needs}.*attention_impl=auto"):
      ai.resolve(impl, seq_len=64, dtype=jnp.bfloat16, head_dim=32)
  with pytest.raises(ConfigError, match="attention_impl"):
    ModelConfig(attention_impl="flash").validate()
  with pytest.raises(ConfigError, match="attention_block_size"):
    ModelConfig(attention_block_size=-1).validate()
