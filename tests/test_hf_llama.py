"""Hugging Face Llama import/export against `transformers.LlamaForCausalLM` itself (torch, CPU), at
odd shapes: 6 query heads over 2 kv heads, 5 layers, hidden 48, vocab 301, tied and untied."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ztt_jax import export
from ztt_jax.convert import ConvertError, hf_llama
from ztt_jax.model import ModelConfig
from ztt_jax.model import ZTTModel

V, L = 301, 5
TOKS = np.random.default_rng(0).integers(0, V, (2, 11))


def hf_model(tie, seed=0, **kw):
  """A random Llama whose every param (norm scales too) is non-trivial."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=L,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                 rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                 bos_token_id=1, eos_token_id=2, **kw)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(toks))).logits.numpy()


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(lambda p, t: ZTTModel(cfg).apply({"params": p}, t)[0])


def ours(path):
  model, params = export.load(path)
  return model, params, np.asarray(_apply(model.cfg)(params, jnp.asarray(TOKS)))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf(request, tmp_path_factory):
  model = hf_model(request.param)
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(str(path))
  return model, str(path)


def test_import_equals_hugging_face_and_export_loads_back(hf, tmp_path):
  model, hf_dir = hf
  out = hf_llama.import_hf(hf_dir, str(tmp_path / "v"), to="vanilla")
  zmodel, params, got = ours(out)
  cfg = zmodel.cfg
  assert (cfg.num_heads, cfg.kv_heads, cfg.n_middle_layers, cfg.rope_theta) == (6, 2, L, 5000.0)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  np.testing.assert_allclose(got, hf_logits(model, TOKS), atol=1e-4, rtol=0)
  back = transformers.LlamaForCausalLM.from_pretrained(hf_llama.export_hf(out, str(tmp_path / "hf"))).eval()
  np.testing.assert_allclose(hf_logits(back, TOKS), got, atol=1e-4, rtol=0)


def test_sharded_checkpoint_imports(tmp_path):
  model = hf_model(True)  # tied: one sharded case is enough
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  out = hf_llama.import_hf(str(tmp_path / "sharded"), str(tmp_path / "v"))
  np.testing.assert_allclose(ours(out)[2], hf_logits(model, TOKS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "rope_parameters.rope_type='llama3'"),
    ("sliding_window", 16, "sliding_window=16"),
    ("attention_bias", True, "attention_bias=True"),
    ("architectures", ["Qwen2ForCausalLM"], "architectures=.*Qwen2ForCausalLM"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
])
def test_what_the_model_cannot_compute_is_one_line_naming_the_field(field, value, match, tmp_path):
  cfg = hf_model(True).config.to_dict()
  cfg[field] = value
  with pytest.raises(ConvertError, match=match) as e:
    hf_llama.model_config_from_hf(json.loads(json.dumps(cfg)))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, match", [
    (dict(norm="layernorm"), "norm='layernorm'"),
    (dict(variant="ztt", num_cycles=2), "variant='ztt'"),
    (dict(token_shift=True), "token_shift=True"),
])
def test_export_refuses_what_llama_cannot_hold_naming_it(change, match):
  form = dict(variant="vanilla", num_cycles=1, vocab_size=V, d_model=48, num_heads=6, num_kv_heads=2, mlp_dim=80)
  cfg = ModelConfig(**{**form, **change}).validate()
  with pytest.raises(ConvertError, match=f"Hugging Face Llama: {match}.*--config.model.variant=vanilla"):
    hf_llama.to_hf(cfg, {})
