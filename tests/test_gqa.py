"""Grouped-query attention (model.num_kv_heads): against the numpy reference, and a GQA model equals
the multi-head model whose k/v weights repeat each kv head over its group, for every implementation
that runs on CPU, in cached decoding too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_numpy_ref import attention as np_attention
from model_testutil import init_params, jitted_apply, tiny_cfg, tokens
from ztt_jax import decoding, flops
from ztt_jax.errors import ConfigError
from ztt_jax.model import attention_impls as ai

H, G, B, T = 4, 2, 2, 7
GQA = dict(num_heads=H, num_kv_heads=G, d_model=32, zero_bias=True)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_grouped_attention_matches_numpy(impl):
  r = np.random.default_rng(0)
  q = r.normal(size=(B, T, H, 8))
  k, v = (r.normal(size=(B, T, G, 8)) for _ in range(2))
  zk, zb = 2.0 * r.normal(size=(H, 8)), r.normal(size=(H,))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  out, a0 = ai.attention(impl, f32(q), f32(k), f32(v), f32(zk), f32(zb), block_size=4)
  for b in range(B):
    ref_out, ref_a0 = np_attention(q[b], k[b], v[b], zk, zb)
    np.testing.assert_allclose(np.asarray(out[b]), ref_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(a0[b]), ref_a0, atol=1e-6)


def _as_mha(params):
  """The multi-head params that compute what the GQA params do: kv head g repeated over its group."""
  def fix(path, a):
    name = path[-1].key
    return jnp.repeat(a, H // G, axis=-2) if name in ("k_kernel", "v_kernel") else a
  return jax.tree_util.tree_map_with_path(fix, params)


@pytest.fixture(scope="module")
def gqa():
  model, params = init_params(tiny_cfg(**GQA, attention_impl="chunked", attention_block_size=4), B, T)
  return model, params, tokens(model.cfg, B, T)


def test_gqa_params_and_cache_hold_only_the_kv_heads(gqa):
  model, params, _ = gqa
  attn = params["middle"]["layers"]["attn"]
  assert attn["q_kernel"].shape[-2] == H and attn["k_kernel"].shape[-2] == G == attn["v_kernel"].shape[-2]
  cache = decoding.init_cache(model.cfg, B, T)
  assert cache["middle"]["k"].shape[-2] == G
  mha = model.cfg.replace(num_kv_heads=None)
  d, K = model.cfg.d_model, model.cfg.head_dim
  per_layer = flops.layer_flops_per_token(mha, T) - flops.layer_flops_per_token(model.cfg, T)
  assert per_layer == 2 * 2 * d * (H - G) * K  # k and v projections of the missing heads


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gqa_equals_mha_with_repeated_kv_weights(gqa, impl):
  model, params, toks = gqa
  got_model, _ = init_params(model.cfg.replace(attention_impl=impl), B, T)
  mha_model, _ = init_params(model.cfg.replace(attention_impl=impl, num_kv_heads=None), B, T)
  got, got_aux = jitted_apply(got_model)(params, toks)
  want, want_aux = jitted_apply(mha_model)(_as_mha(params), toks)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)  # logits ~6: f32 rounding
  np.testing.assert_allclose(np.asarray(got_aux["zero_attention"]), np.asarray(want_aux["zero_attention"]), atol=1e-6)


def test_gqa_cached_decoding_equals_the_full_forward(gqa):
  model, params, toks = gqa
  want, _ = jitted_apply(model)(params, toks)
  cache = decoding.init_cache(model.cfg, B, T)
  got = []
  for p in range(T):
    logits, cache, _ = decoding.forward_cached_jit(model, params, toks[:, p:p + 1], cache, p, None)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), np.asarray(want), atol=1e-4, rtol=0)


def test_num_kv_heads_must_divide_num_heads():
  with pytest.raises(ConfigError, match=r"model.num_kv_heads=3: must divide num_heads=4"):
    tiny_cfg(num_heads=4, num_kv_heads=3)
  assert tiny_cfg(num_heads=4, num_kv_heads=0).kv_heads == 4
  assert tiny_cfg(num_heads=4, num_kv_heads=1).kv_heads == 1


def test_kv_heads_split_over_tensor_when_divisible_else_replicated(gqa, caplog):
  import types
  from jax.sharding import AxisType
  from ztt_jax import partitioning
  from ztt_jax.config import DEFAULT_LOGICAL_AXIS_RULES
  model, _, toks = gqa
  rules = partitioning.rules(types.SimpleNamespace(logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES))
  boxed = jax.eval_shape(model.init, jax.random.key(0), toks)["params"]
  for shape, kv_spec in (((2, 2, 2), "tensor"), ((1, 2, 4), None)):
    mesh = jax.make_mesh(shape, partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    attn = partitioning.param_shardings(boxed, mesh, rules)["middle"]["layers"]["attn"]
    assert attn["k_kernel"].spec[2] == kv_spec and attn["q_kernel"].spec[2] == "tensor"
  assert "num_kv_heads=2 does not split" in caplog.text
