"""Per-cycle LoRA on the shared stack (model.cycle_lora_rank, Relaxed Recursive Transformers): a
full-rank conversion reproduces the original Llama's logits; with its deltas zeroed and the average's
norms it is plain `average`; cached decoding with per-token exit equals the full forward; FLOPs and
params count the deltas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_numpy_ref import gap_thresholds
from model_testutil import init_params, jitted_apply, tiny_cfg, tokens
from test_hf_llama import TOKS, hf_logits, hf_model
from ztt_jax import decoding, export, flops
from ztt_jax.convert import ConvertError, hf_llama
from ztt_jax.model import ExitRule, ZTTModel
from ztt_jax.model import lora


@functools.lru_cache(maxsize=None)
def _masked_apply(cfg):
  return jax.jit(lambda p, t: ZTTModel(cfg, mask_zero_slot=True).apply({"params": p}, t)[0])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model = hf_model(False, seed=3)  # 5 layers: head + 3 middle + tail = 3 cycles of 1 shared layer
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(str(path))
  return model, str(path)


def test_full_rank_reproduces_the_original_and_zero_deltas_are_plain_average(llama, tmp_path):
  model, hf_dir = llama
  kw = dict(to="ztt", num_cycles=3, n_middle_layers=1, middle_init="average")
  zmodel, params = export.load(hf_llama.import_hf(hf_dir, str(tmp_path / "full"), lora_rank=48, **kw))
  assert zmodel.cfg.cycle_lora_rank == 48
  got = np.asarray(_masked_apply(zmodel.cfg)(params, jnp.asarray(TOKS)))
  np.testing.assert_allclose(got, hf_logits(model, TOKS), atol=1e-4, rtol=0)
  amodel, avg = export.load(hf_llama.import_hf(hf_dir, str(tmp_path / "avg"), **kw))
  assert amodel.cfg.cycle_lora_rank == 0
  want = np.asarray(_masked_apply(amodel.cfg)(avg, jnp.asarray(TOKS)))
  assert np.abs(want - got).max() > 0.1  # averaging alone loses the model; the deltas bring it back

  def zero_deltas(path, a):
    name = path[-1].key
    if name.endswith("_lora_b"):
      return jnp.zeros_like(a)
    if name in ("scale", "bias") and path[0].key == "middle":  # the average's norms, in every cycle
      parent = avg["middle"]["layers"][path[-2].key][name]
      return jnp.broadcast_to(parent[:, None], a.shape)
    return a
  zeroed = jax.tree_util.tree_map_with_path(zero_deltas, params)
  np.testing.assert_allclose(np.asarray(_masked_apply(zmodel.cfg)(zeroed, jnp.asarray(TOKS))), want, atol=1e-5,
                             rtol=0)


def test_lora_needs_one_original_layer_per_cycle_and_layer(llama, tmp_path):
  _, hf_dir = llama
  with pytest.raises(ConvertError, match="num_cycles \\* n_middle_layers"):
    hf_llama.import_hf(hf_dir, str(tmp_path / "x"), to="ztt", num_cycles=2, middle_init="average", lora_rank=4)


def test_cached_decoding_with_lora_and_exit_equals_the_full_forward():
  cfg = tiny_cfg(cycle_lora_rank=2, num_kv_heads=1, attention_impl="chunked")
  model, params = init_params(cfg, 2, 7)
  toks = tokens(cfg, 2, 7)
  _, aux = jitted_apply(model)(params, toks)
  tau = gap_thresholds(np.asarray(aux["zero_attention"][0]))[0]
  want, want_aux = jitted_apply(model)(params, toks, tau)
  rule = ExitRule.from_config(cfg, threshold=tau)
  cache = decoding.init_cache(cfg, 2, 7)
  got, used = [], []
  for p in range(7):
    logits, cache, a = decoding.forward_cached_jit(model, params, toks[:, p:p + 1], cache, p, rule)
    got.append(logits)
    used.append(a["cycles_used"])
  np.testing.assert_array_equal(np.concatenate(used, 1), np.asarray(want_aux["cycles_used"]))
  assert len(np.unique(np.asarray(want_aux["cycles_used"]))) > 1  # some tokens exit early: frozen K/V per cycle
  np.testing.assert_allclose(np.concatenate(got, 1), np.asarray(want), atol=1e-4, rtol=0)


def test_flops_and_params_count_the_deltas():
  cfg = tiny_cfg(cycle_lora_rank=3, num_kv_heads=1)
  plain = cfg.replace(cycle_lora_rank=0)
  T = 6
  extra = flops.forward_flops_per_token(cfg, T) - flops.forward_flops_per_token(plain, T)
  assert extra == cfg.cycles * cfg.stack_layers * lora.flops_per_layer(cfg) > 0
  n = lambda c: ZTTModel.unique_params(init_params(c)[1])  # noqa: E731
  D, F, HK, GK, r, C, S = cfg.d_model, cfg.mlp_dim, cfg.num_heads * cfg.head_dim, cfg.head_dim, 3, cfg.cycles, 2
  deltas = r * (2 * (D + HK) + 2 * (D + GK) + 3 * (D + F))
  norms = 2 * D * (C - 1)  # the norm scales become per cycle
  assert n(cfg) - n(plain) == S * (C * deltas + norms)
  assert lora.flops_per_layer(cfg) == 2 * deltas
