"""Param tree and its logical axes, the GPT-2 block form, the zero-slot mask hook, bfloat16, and a
sharded run under jax.set_mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

import model_numpy_ref as ref
from model_testutil import apply, init_params, tiny_cfg, tokens
from ztt_jax.model import ExitRule, ZTTModel

AXES = {"embed", "vocab", "heads", "kv_heads", "kv", "mlp", "layers", "cycles", "length", "lora"}
RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
         ("mlp", "tensor"), ("kv", None), ("layers", None), ("cycles", None), ("length", None)]


def _boxed_abstract(cfg, B=2, T=6):
  return jax.eval_shape(ZTTModel(cfg).init, jax.random.key(0), jnp.zeros((B, T), jnp.int32))["params"]


def test_every_param_is_logically_partitioned_and_tree_is_documented():
  cfg = tiny_cfg(zero_token_layers="all", zero_bias=True, norm="layernorm", position="learned", mlp="gelu",
                 use_bias=True, tie_embeddings=False)
  boxed = _boxed_abstract(cfg)
  leaves = jax.tree.leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for _, x in leaves)
  for path, box in leaves:
    assert len(box.names) == len(box.value.shape) and set(box.names) <= AXES, path
  p = nn.unbox(boxed)
  S, H, K, D, F = cfg.n_middle_layers, cfg.num_heads, cfg.head_dim, cfg.d_model, cfg.mlp_dim
  assert boxed["zero_key_pool"].names == ("cycles", "layers", "heads", "kv")
  assert p["zero_key_pool"].shape == (cfg.cycles, S, H, K) and p["zero_bias_pool"].shape == (cfg.cycles, S, H)
  assert p["middle"]["layers"]["attn"]["q_kernel"].shape == (S, D, H, K)
  assert boxed["middle"]["layers"]["attn"]["q_kernel"].names == ("layers", "embed", "heads", "kv")
  assert p["middle"]["layers"]["attn"]["o_kernel"].shape == (S, H, K, D)
  assert p["head"]["layers"]["mlp"]["wi_kernel"].shape == (1, D, F) and "wg_kernel" not in p["head"]["layers"]["mlp"]
  assert p["tail"]["zero_key"].shape == (1, H, K) and p["head"]["zero_bias"].shape == (1, H)
  assert set(p["head"]["layers"]["attn_norm"]) == {"scale", "bias"} and "o_bias" in p["tail"]["layers"]["attn"]
  assert p["embed"]["pos_embedding"].shape == (cfg.max_seq_len, D) and p["embed"]["lm_head"].shape == (D, 32)
  assert set(p) == {"embed", "head", "middle", "tail", "final_norm", "zero_key_pool", "zero_bias_pool"}
  # no cycle axis on shared weights: every middle leaf leads with the layer axis only
  assert all(x.shape[0] == S for x in jax.tree.leaves(p["middle"]))


def test_gpt2_form_matches_numpy_reference():
  cfg = tiny_cfg(norm="layernorm", position="learned", mlp="gelu", use_bias=True, zero_bias=True)
  model, params = init_params(cfg, seed=11)
  toks = tokens(cfg, seed=11)
  logits, aux = apply(model, params, toks)
  want, sig, _, _ = ref.forward(ref.to_np(params), np.asarray(toks), cfg)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["zero_attention"]), sig, rtol=1e-4, atol=1e-5)


def test_masked_zero_slot_gives_exactly_the_no_zero_token_logits():
  cfg = tiny_cfg(zero_token_layers="all")
  model, params = init_params(cfg, seed=4)
  toks = tokens(cfg, seed=4)
  masked, aux = apply(ZTTModel(cfg, mask_zero_slot=True), params, toks)
  plain_cfg = cfg.replace(zero_token=False, zero_token_layers="middle")
  plain_params = {k: v for k, v in params.items() if k != "zero_key_pool"}
  for stack in ("head", "tail"):
    plain_params[stack] = {"layers": params[stack]["layers"]}
  plain, _ = apply(ZTTModel(plain_cfg), plain_params, toks)
  np.testing.assert_array_equal(np.asarray(masked), np.asarray(plain))
  assert not np.asarray(aux["zero_attention"]).any()
  unmasked, _ = apply(model, params, toks)
  assert np.abs(np.asarray(unmasked) - np.asarray(plain)).max() > 1e-3


def test_bfloat16_compute_has_no_nan_and_tracks_float32():
  cfg = tiny_cfg(dtype="bfloat16", cycle_loss_weight=0.5)
  model, params = init_params(cfg, seed=2)
  toks = tokens(cfg, seed=2)
  bf, aux = apply(model, params, toks, 0.3)
  assert bf.dtype == jnp.float32 and aux["cycle_logits"].dtype == jnp.float32
  for x in (bf, aux["cycle_logits"], aux["zero_attention"]):
    assert np.isfinite(np.asarray(x)).all()
  assert len(np.unique(np.asarray(aux["cycles_used"]))) >= 2
  f32, _ = apply(ZTTModel(cfg.replace(dtype="float32")), params, toks)
  bf_noexit, _ = apply(model, params, toks, 2.0)
  err = np.abs(np.asarray(bf_noexit) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  assert err < 0.1, err


def test_sharded_under_set_mesh_gives_the_same_logits():
  cfg = tiny_cfg(cycle_loss_weight=0.5)
  model = ZTTModel(cfg)
  B, T = 4, 6
  toks = tokens(cfg, B, T, seed=1)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  _, host = init_params(cfg, B, T, seed=1)
  fwd = lambda p, t: model.apply({"params": p}, t, ExitRule(threshold=0.4))
  with nn.logical_axis_rules(RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), toks)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    params = jax.device_put(host, shardings)
    with jax.set_mesh(mesh):
      jaxpr = str(jax.make_jaxpr(fwd)(params, toks))
      logits, aux = jax.jit(fwd)(params, toks)
  q = params["middle"]["layers"]["attn"]["q_kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 8, 1, 8)
  assert "sharding_constraint" in jaxpr
  want, want_aux = jax.jit(fwd)(host, toks)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["cycles_used"]), np.asarray(want_aux["cycles_used"]))
  np.testing.assert_allclose(np.asarray(aux["cycle_logits"]), np.asarray(want_aux["cycle_logits"]),
                             rtol=1e-5, atol=1e-5)
