"""Hugging Face GPT-2 import/export against `transformers.GPT2LMHeadModel` itself (torch, CPU)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ztt_jax import config as config_lib
from ztt_jax import data as data_lib
from ztt_jax import export, restore, trainer
from ztt_jax import run as run_lib
from ztt_jax.convert import hf_gpt2
from ztt_jax.metrics import read_metrics
from ztt_jax.model import ModelConfig, ZTTModel
import model_numpy_ref as numpy_ref
from model_testutil import init_params
from test_config import load_config

V, P = 300, 48  # vocab >= 259 so byte data fits; positions >= the tiny config's seq_len


def hf_model(n_layer, seed=0, **kw):
  """A randomly initialised GPT-2 whose every param (biases and norms too) is non-trivial."""
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=32, n_layer=n_layer, n_head=2,
                                bos_token_id=0, eos_token_id=0, **kw)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def save(model, path):
  model.save_pretrained(str(path))
  return str(path)


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(toks))).logits.numpy()


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  # The mask is traced, so masked and unmasked share one compile.
  return jax.jit(lambda p, t, m: ZTTModel(cfg, mask_zero_slot=m).apply({"params": p}, t))


def ztt_logits(model, params, toks, mask_zero_slot=False):
  logits, aux = _apply(model.cfg)(params, jnp.asarray(toks), jnp.asarray(mask_zero_slot))
  return np.asarray(logits), aux


TOKS = np.random.default_rng(0).integers(0, V, (2, 16))


@pytest.fixture(scope="module")
def hf3(tmp_path_factory):
  model = hf_model(3, n_inner=48)  # n_inner != 4 * n_embd: checks it maps to mlp_dim
  return model, save(model, tmp_path_factory.mktemp("hf3"))


def test_vanilla_import_equals_hugging_face(hf3, tmp_path):
  model, hf_dir = hf3
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "v"), to="vanilla")
  zmodel, params = export.load(out)
  assert zmodel.cfg.canonical_variant == "vanilla" and zmodel.cfg.n_middle_layers == 3
  assert zmodel.cfg.mlp_dim == 48
  got, _ = ztt_logits(zmodel, params, TOKS)
  np.testing.assert_allclose(got, hf_logits(model, TOKS), atol=1e-4, rtol=0)


def test_ztt_import_starts_with_a0_near_zero_and_hf_logits(hf3, tmp_path):
  # n_layer=3, one cycle: head + 1 middle + tail is exactly the HF model except for the zero slot.
  model, hf_dir = hf3
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "z"), to="ztt", num_cycles=1)
  zmodel, params = export.load(out)
  cfg = zmodel.cfg
  assert (cfg.variant, cfg.n_head_layers, cfg.n_middle_layers, cfg.n_tail_layers) == ("ztt", 1, 1, 1)
  want = hf_logits(model, TOKS)
  got, aux = ztt_logits(zmodel, params, TOKS)
  a0_max = float(jnp.max(aux["zero_attention"]))
  assert 0 < a0_max < 1e-3, a0_max
  np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)  # off only by the zero slot's tiny mass
  masked, _ = ztt_logits(zmodel, params, TOKS, mask_zero_slot=True)
  np.testing.assert_allclose(masked, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("middle_init", ["copy", "average"])
def test_ztt_middle_init_equals_hf_model_with_tied_middle_layers(middle_init, tmp_path):
  # 4 layers, 2 cycles of one shared layer: the reference is the HF model itself with both middle
  # layers replaced by what the conversion should share (layer 1, or the mean of layers 1 and 2).
  model = hf_model(4, seed=1)
  hf_dir = save(model, tmp_path / "hf4")
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "z"), to="ztt", num_cycles=2, middle_init=middle_init)
  zmodel, params = export.load(out)
  assert zmodel.cfg.n_middle_layers == 1 and zmodel.cfg.num_cycles == 2
  with torch.no_grad():
    h1, h2 = model.transformer.h[1], model.transformer.h[2]
    for p1, p2 in zip(h1.parameters(), h2.parameters()):
      shared = p1.clone() if middle_init == "copy" else (p1 + p2) / 2
      p1.copy_(shared)
      p2.copy_(shared)
  # float64 loops over the converted tree, zero slot off (the jitted model is checked against HF above)
  got = numpy_ref.forward(numpy_ref.to_np(params), TOKS, zmodel.cfg, mask_zero=True)[0]
  np.testing.assert_allclose(got, hf_logits(model, TOKS), atol=1e-4, rtol=0)


def test_average_groups_consecutive_layers(tmp_path):
  model = hf_model(7, seed=2)  # 5 middle layers onto k=2: groups (1, 2, 3) and (4, 5)
  hf_dir = save(model, tmp_path / "hf7")
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "z"), to="ztt", num_cycles=2, middle_init="average")
  _, params = export.load(out)
  w = [model.transformer.h[i].mlp.c_fc.weight.detach().numpy() for i in range(7)]
  got = params["middle"]["layers"]["mlp"]["wi_kernel"]
  np.testing.assert_allclose(got[0], (w[1] + w[2] + w[3]) / 3, atol=1e-6)
  np.testing.assert_allclose(got[1], (w[4] + w[5]) / 2, atol=1e-6)
  np.testing.assert_array_equal(params["head"]["layers"]["mlp"]["wi_kernel"][0], w[0])
  np.testing.assert_array_equal(params["tail"]["layers"]["mlp"]["wi_kernel"][0], w[6])


def test_vanilla_export_to_hf_loads_with_equal_logits(tmp_path):
  # A GPT-2-form model of our own (head + middle + tail layers, untied head, random params), not from HF.
  cfg = ModelConfig(variant="vanilla", vocab_size=V, d_model=32, num_heads=2, mlp_dim=96, n_head_layers=1,
                    n_middle_layers=2, n_tail_layers=1, num_cycles=1, max_seq_len=P, norm="layernorm",
                    position="learned", mlp="gelu", use_bias=True, tie_embeddings=False, norm_eps=1e-5)
  _, params = init_params(cfg)
  path = export.save(str(tmp_path / "ours"), cfg, params)
  hf_dir = hf_gpt2.export_hf(path, str(tmp_path / "hf"))
  model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  assert model.config.n_layer == 4 and model.config.n_inner == 96 and not model.config.tie_word_embeddings
  want = numpy_ref.forward(numpy_ref.to_np(params), TOKS, cfg)[0]  # float64 loops over our param tree
  np.testing.assert_allclose(hf_logits(model, TOKS), want, atol=1e-4, rtol=0)


def test_hf_round_trip_through_vanilla_export(hf3, tmp_path):
  model, hf_dir = hf3  # tied embeddings, n_inner set
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "v"), to="vanilla")
  back = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2.export_hf(out, str(tmp_path / "hf"))).eval()
  assert back.config.tie_word_embeddings and back.config.n_inner == model.config.n_inner
  assert back.config.eos_token_id == model.config.eos_token_id  # non-architecture fields kept
  np.testing.assert_allclose(hf_logits(back, TOKS), hf_logits(model, TOKS), atol=1e-5, rtol=0)


def test_init_from_finetuning_starts_from_the_converted_params(hf3, tmp_path):
  _, hf_dir = hf3
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "z"), to="ztt", num_cycles=2)
  cd = load_config("finetune", out)  # model section and init_from from the export
  text = tmp_path / "text.txt"
  text.write_text("".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(300)))
  # eval_fraction=0: no held-out set, so the run compiles only its train step
  cd.data.path, cd.data.seq_len, cd.data.eval_fraction = str(text), 16, 0.0
  cd.data.cache_dir = str(tmp_path / "cache")
  cd.train.steps, cd.log.every_steps, cd.eval.every_steps, cd.eval.max_batches = 1, 1, 1, 1
  cd.log.tensorboard, cd.train.peak_flops_per_device = False, 1.0
  cd.model.remat_policy, cd.mesh.shape = "none", (1, 1, 1)  # the smallest compile
  cfg = config_lib.parse(cd)
  assert cfg.init_from == os.path.abspath(out)
  trainer.train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  first = next(r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r)["train/loss"]

  batch = next(data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size,
                                            vocab_size=cfg.model.vocab_size))
  zmodel, params = export.load(out)
  logits = numpy_ref.forward(numpy_ref.to_np(params), batch["inputs"], zmodel.cfg)[0]  # float64 loops
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  want = float((ce * batch["weights"]).sum() / batch["weights"].sum())
  np.testing.assert_allclose(first, want, rtol=1e-4)


def test_init_from_with_another_model_config_names_the_fix(hf3, tmp_path):
  _, hf_dir = hf3
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "z"), to="ztt", num_cycles=2)
  cd = load_config("finetune", out)
  cd.model.d_model = 64
  cd.data.kind, cd.data.seq_len, cd.data.max_hops = "multihop", 48, 3
  run = run_lib.build(config_lib.parse(cd))
  with pytest.raises(config_lib.ConfigError, match="configs/finetune.py"):
    restore.load_init_params(out, run)


# ------------------------------------------------------------------ bad input

def _write_hf(tmp_path, model, **config_changes):
  hf_dir = save(model, tmp_path / "hf")
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    c = json.load(f)
  c.update(config_changes)
  with open(path, "w") as f:
    json.dump(c, f)
  return hf_dir


@pytest.mark.parametrize("change, match", [
    (dict(activation_function="relu"), "activation_function"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(vocab_size=V + 1), "vocab_size"),
    (dict(model_type="llama"), "model_type"),
])
def test_unsupported_hf_config_is_refused(hf3, tmp_path, change, match):
  model, _ = hf3
  hf_dir = _write_hf(tmp_path, model, **change)
  with pytest.raises(hf_gpt2.ConvertError, match=match):
    hf_gpt2.import_hf(hf_dir, str(tmp_path / "out"))


def test_missing_input_is_named(hf3, tmp_path):
  with pytest.raises(hf_gpt2.ConvertError, match="not a directory"):
    hf_gpt2.import_hf(str(tmp_path / "nope"), str(tmp_path / "out"))
  model, _ = hf3
  hf_dir = save(model, tmp_path / "hf")
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  with pytest.raises(hf_gpt2.ConvertError, match="no model.safetensors"):
    hf_gpt2.import_hf(hf_dir, str(tmp_path / "out"))
  with pytest.raises(hf_gpt2.ConvertError, match="n_layer >= 3"):
    hf_gpt2.import_hf(save(hf_model(2), tmp_path / "hf2"), str(tmp_path / "out"), to="ztt")


def test_only_vanilla_gpt2_form_exports_to_hf(hf3, tmp_path):
  _, hf_dir = hf3
  out = hf_gpt2.import_hf(hf_dir, str(tmp_path / "z"), to="ztt", num_cycles=1)
  with pytest.raises(hf_gpt2.ConvertError, match="vanilla"):
    hf_gpt2.export_hf(out, str(tmp_path / "hf_out"))
