"""Cycled forward vs plain loops; param sharing; gradients of shared params; HLO size."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_numpy_ref as ref
from model_testutil import apply, init_params, tiny_cfg, tokens
from ztt_jax.model import ExitRule, ZTTModel, count_params
from ztt_jax.model.block import Block
from ztt_jax.model.layers import Norm


@pytest.mark.parametrize("variant, extra, num_cycles", [
    ("ztt", {}, None),
    ("htc", {}, None),
    ("bc", {}, None),
    ("vanilla", {}, None),
    # more cycles than the pool holds: rows beyond it reuse the last row
    ("ztt", dict(zero_token_layers="all", zero_bias=True, zero_bias_init=-0.5, tie_embeddings=False), 5),
])
def test_scan_matches_python_loop_reference(variant, extra, num_cycles):
  cfg = tiny_cfg(variant=variant, **extra)
  model, params = init_params(cfg)
  toks = tokens(cfg)
  logits, aux = apply(model, params, toks, num_cycles=num_cycles)
  want, sig, used, _ = ref.forward(ref.to_np(params), np.asarray(toks), cfg, num_cycles=num_cycles)
  C = num_cycles or cfg.cycles
  assert logits.dtype == jnp.float32 and aux["zero_attention"].shape == (C, 2, 6)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["zero_attention"]), sig, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["cycles_used"]), used)
  if cfg.use_zero_token:
    assert float(np.std(sig)) > 1e-3  # the signal is not a constant
  else:
    assert not np.any(np.asarray(aux["zero_attention"]))


def _abstract_params(cfg):
  return jax.eval_shape(ZTTModel(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def test_param_count_does_not_depend_on_cycles_pool_aside():
  counts = {}
  for C in (2, 5):
    cfg = tiny_cfg(num_cycles=C)
    p = _abstract_params(cfg)
    counts[C] = (count_params(p, include_pool=False), count_params(p))
  assert counts[2][0] == counts[5][0]
  cfg = tiny_cfg()
  assert counts[5][1] - counts[2][1] == 3 * cfg.stack_layers * cfg.num_heads * cfg.head_dim


def test_bc_htc_ztt_same_count_differing_only_by_pool():
  n = {}
  for v in ("vanilla", "bc", "htc", "ztt"):
    cfg = tiny_cfg(variant=v)
    n[v] = ZTTModel.unique_params(_abstract_params(cfg))
  cfg = tiny_cfg()
  pool = cfg.cycles * cfg.n_middle_layers * cfg.num_heads * cfg.head_dim
  assert n["bc"] == n["htc"] == n["vanilla"] == n["ztt"] - pool
  assert tiny_cfg(variant="bc").effective_depth == 3 * 4 and tiny_cfg(variant="ztt").effective_depth == 1 + 6 + 1


def _unrolled_logits(cfg, p, middle_copies, pool_rows, toks):
  """Python loop over cycles and layers; cycle c uses its own copy of the middle params and pool row."""
  blk, norm = Block(cfg), Norm(cfg)
  x = p["embed"]["embedding"][toks]
  for c in range(cfg.cycles):
    for j in range(cfg.n_middle_layers):
      lp = jax.tree.map(lambda a: a[j], middle_copies[c]["layers"])
      x = blk.apply({"params": lp}, x, (pool_rows[c][j], None), None).x
  x = norm.apply({"params": p["final_norm"]}, x)
  return x @ p["embed"]["embedding"].T


def test_shared_kernel_grad_is_sum_of_per_cycle_grads():
  # remat=nothing_saveable: the rematerialised backward must match the plain unrolled one
  cfg = tiny_cfg(n_head_layers=0, n_tail_layers=0, num_cycles=2, remat_policy="nothing_saveable")
  model, p = init_params(cfg)
  toks = tokens(cfg)
  w = jax.random.normal(jax.random.key(7), (2, 6, cfg.vocab_size))

  def loss_model(p):
    return jnp.sum(model.apply({"params": p}, toks)[0] * w)

  def loss_unrolled(copies, rows):
    return jnp.sum(_unrolled_logits(cfg, p, copies, rows, toks) * w)

  copies = [p["middle"]] * cfg.cycles
  rows = [p["zero_key_pool"][c] for c in range(cfg.cycles)]
  l, g = jax.jit(jax.value_and_grad(loss_model))(p)
  l_ref, (g_copies, g_rows) = jax.jit(jax.value_and_grad(loss_unrolled, argnums=(0, 1)))(copies, rows)
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  summed = jax.tree.map(lambda *gs: sum(gs), *g_copies)
  for path, got in jax.tree_util.tree_leaves_with_path(g["middle"]):
    want = summed
    for k in path:
      want = want[k.key]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()), err_msg=str(path))
  # each cycle's contribution is distinct, so a missing cycle could not pass unnoticed
  q = [gc["layers"]["attn"]["q_kernel"] for gc in g_copies]
  assert float(jnp.abs(q[0] - q[-1]).max()) > 1e-2 * float(jnp.abs(q[0]).max())
  for c in range(cfg.cycles):  # the pool gradient reaches each row separately
    np.testing.assert_allclose(g["zero_key_pool"][c], g_rows[c], rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(g_rows[c]).max()))
    assert float(jnp.abs(g_rows[c]).max()) > 0


def _hlo_chars(cfg):
  model = ZTTModel(cfg)
  toks = jnp.zeros((2, 8), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), toks)["params"]))
  return len(jax.jit(lambda p, t: model.apply({"params": p}, t, ExitRule(threshold=0.5))).lower(params, toks).as_text())


def test_hlo_does_not_grow_with_cycles_or_layers():
  base = _hlo_chars(tiny_cfg(num_cycles=2, n_middle_layers=1))
  assert _hlo_chars(tiny_cfg(num_cycles=32, n_middle_layers=1)) < 1.05 * base
  assert _hlo_chars(tiny_cfg(num_cycles=2, n_middle_layers=8)) < 1.05 * base
