"""model.attention_impl: chunked (and the fused-kernel construction) against the dense reference.

Function level: out to 2e-5, a0 to 1e-6, gradients of q, k, v, zero key and zero bias to 1e-4, on
lengths that are not multiples of the block, with decoding positions, zero bias and a masked slot.
Model level: ZTTModel logits and all param gradients, per-token exit, bfloat16, cached decoding.
Memory: the chunked backward's jaxpr holds no array with both a query and a key length axis.
"""
import functools

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
    (2, 5, 21, 8, "decode"),   # prefill of 5 tokens at offset 3 into a 21-slot cache
    (1, 1, 21, 8, "decode"),   # one decoding step
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


def test_pallas_construction_in_interpret_mode():
  """The TPU kernel's zero-slot construction, run by Pallas's CPU interpreter (forward and backward)."""
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
  for eqn in jaxpr.eqns:
    acc.extend(tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape"))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else (p,)):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
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


def test_device_check_runs_and_reports_every_error():
  """benchmarks/attention_check.py, which gpu.sh runs on the accelerators, at a size CPU compiles in
  seconds: auto resolves to chunked here, and every error against the reference is float32-small."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention_check.py"
  spec = importlib.util.spec_from_file_location("attention_check", path)
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  r = check.check_against_reference("auto", batch=1, seq_len=12, num_heads=2, head_dim=8, dtype="float32",
                                    block_size=8)
  assert r["resolved"] == "chunked" and r["backend"] == "cpu"
  for errors in (r["errors"], r["chunked_errors"]):
    assert set(errors) == {"out", "a0", "dq", "dk", "dv", "dzero_key", "dzero_bias"}
    assert max(errors.values()) < 1e-4, errors


# ---------------------------------------------------------------- the model

MB, MT = 2, 7  # batch, sequence (not a multiple of the block)
# Zero keys in every layer, zero bias, block 4 (two query/key blocks, the second padded).
MODEL = dict(zero_token_layers="all", zero_bias=True, attention_block_size=4)


@pytest.fixture(scope="module")
def models():
  from model_testutil import init_params, tiny_cfg, tokens
  ref_model, params = init_params(tiny_cfg(**MODEL, attention_impl="reference"), MB, MT)
  chunked_model, _ = init_params(tiny_cfg(**MODEL, attention_impl="chunked"), MB, MT)
  return ref_model, chunked_model, params, tokens(ref_model.cfg, MB, MT)


def _loss_and_grads(model):
  from ztt_jax.model import ExitRule

  def loss(params, toks):
    logits, aux = model.apply({"params": params}, toks, ExitRule.from_config(model.cfg, threshold=None))
    w_V = jnp.linspace(-1.0, 1.0, logits.shape[-1])
    # The zero-attention term sends a cotangent into a0 itself.
    return jnp.mean(logits * w_V) + jnp.mean(aux["zero_attention"]), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_model_logits_and_every_param_gradient_match(models):
  ref_model, chunked_model, params, toks = models
  (_, ref_logits), ref_grads = _loss_and_grads(ref_model)(params, toks)
  (_, logits), grads = _loss_and_grads(chunked_model)(params, toks)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5, rtol=0)
  flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
  flat = jax.tree.leaves(grads)
  names = [jax.tree_util.keystr(p) for p, _ in flat_ref]
  assert any("zero_key_pool" in n for n in names) and any("zero_bias_pool" in n for n in names)
  assert any("head" in n and "zero_bias" in n for n in names)  # zero_token_layers='all'
  for (path, gr), g in zip(flat_ref, flat):
    np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=1e-4, rtol=0, err_msg=jax.tree_util.keystr(path))
  pool = [np.abs(np.asarray(gr)).max() for p, gr in flat_ref if "zero_key_pool" in jax.tree_util.keystr(p)]
  assert pool[0] > 1e-4  # the comparison is not between two zeros


def test_model_per_token_exit_matches(models):
  from model_numpy_ref import gap_thresholds
  from model_testutil import jitted_apply
  ref_model, chunked_model, params, toks = models
  _, aux = jitted_apply(ref_model)(params, toks)
  tau = gap_thresholds(np.asarray(aux["zero_attention"][0]))[0]
  ref, ref_aux = jitted_apply(ref_model)(params, toks, tau)
  got, got_aux = jitted_apply(chunked_model)(params, toks, tau)
  cycles = np.asarray(ref_aux["cycles_used"])
  assert len(np.unique(cycles)) >= 2  # tokens really exit after different cycles
  np.testing.assert_array_equal(np.asarray(got_aux["cycles_used"]), cycles)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got_aux["zero_attention"]), np.asarray(ref_aux["zero_attention"]), atol=1e-6)


def test_model_bfloat16_error_is_that_of_bfloat16_itself(models):
  """bfloat16 has an 8-bit mantissa; the two implementations round probabilities and outputs at
  different points (normalised vs running sums), so they cannot agree to float32 tolerances. The
  bound: chunked in bfloat16 is no further from the float32 model than the bfloat16 reference is
  (within a factor 2), and the two bfloat16 runs agree to a few bfloat16 ulps of the logits."""
  from model_testutil import init_params, jitted_apply, tiny_cfg
  ref_model, _, params, toks = models
  f32, _ = jitted_apply(ref_model)(params, toks)
  bf = {impl: jitted_apply(init_params(tiny_cfg(**MODEL, attention_impl=impl, dtype="bfloat16"), MB, MT)[0])(
      params, toks)[0] for impl in ("reference", "chunked")}
  err_ref = float(jnp.abs(bf["reference"] - f32).max())
  err_chunked = float(jnp.abs(bf["chunked"] - f32).max())
  scale = float(jnp.abs(f32).max())
  assert 0 < err_ref < 0.05 * scale
  assert err_chunked <= 2 * err_ref, (err_chunked, err_ref)
  assert float(jnp.abs(bf["chunked"] - bf["reference"]).max()) <= 2 * err_ref


def test_cached_decoding_matches_the_full_forward(models):
  """One token per step against a cache of MT slots (two key blocks; the unwritten tail is skipped
  by the trip count), with per-token exit. (Multi-token prefills are the function-level "decode"
  case; generate() runs the same step and is tested in test_generate.py under attention_impl=auto,
  which is chunked on CPU.)"""
  from model_numpy_ref import gap_thresholds
  from model_testutil import jitted_apply
  from ztt_jax import decoding
  from ztt_jax.model import ExitRule
  ref_model, chunked_model, params, toks = models
  _, aux = jitted_apply(ref_model)(params, toks)
  tau = gap_thresholds(np.asarray(aux["zero_attention"][0]))[0]
  ref, ref_aux = jitted_apply(ref_model)(params, toks, tau)
  rule = ExitRule.from_config(chunked_model.cfg, threshold=tau)
  cache = decoding.init_cache(chunked_model.cfg, MB, MT)
  got, cycles = [], []
  for p in range(MT):  # one program: every call has T=1
    logits, cache, aux = decoding.forward_cached_jit(chunked_model, params, toks[:, p:p + 1], cache, p, rule)
    got.append(logits)
    cycles.append(aux["cycles_used"])
  np.testing.assert_array_equal(np.concatenate(cycles, 1), np.asarray(ref_aux["cycles_used"]))
  np.testing.assert_allclose(np.concatenate(got, 1), np.asarray(ref), atol=2e-5, rtol=0)
