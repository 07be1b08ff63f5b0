"""Hugging Face GPT-2 <-> ztt_jax exports.

Import (reads config.json + model.safetensors with the `safetensors` library; no torch, no network):

  python -m ztt_jax.convert.hf_gpt2 --hf_dir=HF_DIR --out=DIR --to=vanilla
  python -m ztt_jax.convert.hf_gpt2 --hf_dir=HF_DIR --out=DIR --to=ztt [--num_cycles=2]
      [--n_middle_layers=k] [--middle_init=copy|average] [--zero_bias_init=-10]

Export (a `vanilla` GPT-2-form export back to a directory `transformers.GPT2LMHeadModel.from_pretrained` loads):

  python -m ztt_jax.convert.hf_gpt2 --export_hf --from=DIR --out=HF_DIR

Both directions write what `ztt_jax.export` writes/reads, so `ztt_jax.export.load(DIR)` and
`python -m ztt_jax.train ... --config.init_from=DIR` take an imported model as it is.

Neither direction destroys what it did not write (see `hf_io` for --export_hf, `ztt_jax.export`
for the import).

Mapping (GPT-2 form: norm=layernorm, position=learned, mlp=gelu with the tanh approximation,
use_bias=True; Conv1D weights are [in, out], the same orientation as ours):
  wte -> embed/embedding, wpe -> embed/pos_embedding, ln_f -> final_norm, lm_head (untied only) -> embed/lm_head^T
  h.i.ln_1 -> attn_norm, h.i.ln_2 -> mlp_norm
  h.i.attn.c_attn [D, 3D] -> q/k/v kernels [D, H, K] (columns are q | k | v, each head-major), bias likewise
  h.i.attn.c_proj [D, D] -> attn/o_kernel [H, K, D];  h.i.mlp.c_fc -> mlp/wi;  h.i.mlp.c_proj -> mlp/wo

--to=vanilla keeps the n_layer layers as one stack, the same function as the HF model; --to=ztt
folds them into head, shared middle and tail with a silent zero slot (`ztt_jax.convert.fold`).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from ztt_jax.convert import ConvertError, family, hf_io
from ztt_jax.model import ModelConfig

# Activations that are GPT-2's tanh-approximate gelu (gelu_fast is the same formula).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older checkpoints
HF_MARKER = hf_io.MARKER  # the --export_hf marker, under the name callers know it by


# ------------------------------------------------------------------ import

def read_hf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {name without 'transformer.': float32 array})."""
  return hf_io.read(path, prefix="transformer.", ignored_suffixes=_IGNORED_SUFFIXES)


def model_config_from_hf(hf_cfg: dict, dtype: str = "float32") -> ModelConfig:
  """The `vanilla` ModelConfig equal to a GPT-2 config; refuses what the model can't express."""
  def need(key, ok, fix):
    if not ok:
      raise ConvertError(f"config.json {key}={hf_cfg.get(key)!r} is not supported: {fix}")

  need("model_type", hf_cfg.get("model_type", "gpt2") == "gpt2", "only GPT-2 (model_type 'gpt2') converts.")
  need("activation_function", hf_cfg.get("activation_function", "gelu_new") in TANH_GELUS,
       f"the model's MLP is the tanh-approximate gelu; use a checkpoint with one of {', '.join(TANH_GELUS)}.")
  need("scale_attn_weights", hf_cfg.get("scale_attn_weights", True) is True,
       "the model always scales attention logits by 1/sqrt(head_dim).")
  need("scale_attn_by_inverse_layer_idx", not hf_cfg.get("scale_attn_by_inverse_layer_idx", False),
       "per-layer 1/(layer+1) attention scaling has no equivalent here (and can't be shared across cycles).")
  need("add_cross_attention", not hf_cfg.get("add_cross_attention", False),
       "cross-attention layers have no equivalent in a decoder-only model.")
  for key in ("n_embd", "n_head", "n_layer", "vocab_size", "n_positions"):
    need(key, isinstance(hf_cfg.get(key), int) and hf_cfg[key] > 0, "must be a positive integer.")
  need("n_embd", hf_cfg["n_embd"] % hf_cfg["n_head"] == 0, "must be divisible by n_head.")
  n_inner = hf_cfg.get("n_inner")
  need("n_inner", n_inner is None or (isinstance(n_inner, int) and n_inner > 0),
       "must be null (4 * n_embd) or a positive integer.")
  return ModelConfig(
      variant="vanilla", num_cycles=1, n_head_layers=0, n_middle_layers=hf_cfg["n_layer"], n_tail_layers=0,
      vocab_size=hf_cfg["vocab_size"], d_model=hf_cfg["n_embd"], num_heads=hf_cfg["n_head"],
      mlp_dim=n_inner or 4 * hf_cfg["n_embd"], max_seq_len=hf_cfg["n_positions"], norm="layernorm",
      norm_eps=float(hf_cfg.get("layer_norm_epsilon", 1e-5)), position="learned", mlp="gelu", use_bias=True,
      tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", True)), param_dtype=dtype).validate()


def _take(tensors: dict, name: str, shape: tuple) -> np.ndarray:
  fix = ("The vocabulary in config.json (vocab_size) and the embedding disagree; fix vocab_size."
         if name in ("wte.weight", "lm_head.weight") else
         "n_positions in config.json and the position table disagree; fix n_positions." if name == "wpe.weight" else "")
  return family.take(tensors, name, shape, architecture="GPT2LMHeadModel", prefix="transformer.", fix=fix)


def hf_layers(cfg: ModelConfig, tensors: dict) -> tuple[dict, list[dict]]:
  """Split HF tensors into (non-layer params, [per-layer block params without the 'layers' axis]).
  Consumes `tensors`; anything left over is an error (an unknown architecture)."""
  D, H, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  tensors = dict(tensors)
  top = {"embed": {"embedding": _take(tensors, "wte.weight", (V, D)),
                   "pos_embedding": _take(tensors, "wpe.weight", (cfg.max_seq_len, D))},
         "final_norm": {"scale": _take(tensors, "ln_f.weight", (D,)), "bias": _take(tensors, "ln_f.bias", (D,))}}
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)  # a copy of wte when tied
  else:
    top["embed"]["lm_head"] = _take(tensors, "lm_head.weight", (V, D)).T.copy()
  layers = []
  for i in range(cfg.n_middle_layers):
    p = f"h.{i}."
    w, b = _take(tensors, p + "attn.c_attn.weight", (D, 3 * D)), _take(tensors, p + "attn.c_attn.bias", (3 * D,))
    attn = {}
    for j, n in enumerate("qkv"):
      attn[f"{n}_kernel"] = w[:, j * D:(j + 1) * D].reshape(D, H, K)
      attn[f"{n}_bias"] = b[j * D:(j + 1) * D].reshape(H, K)
    attn["o_kernel"] = _take(tensors, p + "attn.c_proj.weight", (D, D)).reshape(H, K, D)
    attn["o_bias"] = _take(tensors, p + "attn.c_proj.bias", (D,))
    layers.append({
        "attn_norm": {"scale": _take(tensors, p + "ln_1.weight", (D,)), "bias": _take(tensors, p + "ln_1.bias", (D,))},
        "attn": attn,
        "mlp_norm": {"scale": _take(tensors, p + "ln_2.weight", (D,)), "bias": _take(tensors, p + "ln_2.bias", (D,))},
        "mlp": {"wi_kernel": _take(tensors, p + "mlp.c_fc.weight", (D, F)),
                "wi_bias": _take(tensors, p + "mlp.c_fc.bias", (F,)),
                "wo_kernel": _take(tensors, p + "mlp.c_proj.weight", (F, D)),
                "wo_bias": _take(tensors, p + "mlp.c_proj.bias", (D,))},
    })
  family.refuse_leftovers(tensors, "GPT-2", "n_layer")
  return top, layers


# ------------------------------------------------------------------ export to HF

def to_hf(cfg: ModelConfig, params: dict, base_hf_config: Optional[dict] = None) -> tuple[dict, dict]:
  """(config.json dict, {HF tensor name: numpy array}) of a vanilla GPT-2-form model."""
  family.check_form(cfg, "GPT-2", dict(norm="layernorm", position="learned", mlp="gelu", use_bias=True),
                    {f"num_kv_heads={cfg.num_kv_heads} (GPT-2 has one k/v head per query head)":
                         cfg.kv_heads != cfg.num_heads,
                     "token_shift=True (GPT-2 has no token shift)": cfg.token_shift})
  layers, L = family.vanilla_layers(jax.tree.map(np.asarray, params))
  D = cfg.d_model
  t = {"transformer.wte.weight": params["embed"]["embedding"],
       "transformer.wpe.weight": params["embed"]["pos_embedding"],
       "transformer.ln_f.weight": params["final_norm"]["scale"],
       "transformer.ln_f.bias": params["final_norm"]["bias"]}
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = params["embed"]["lm_head"].T
  for i in range(L):
    p, ly = f"transformer.h.{i}.", jax.tree.map(lambda a, i=i: a[i], layers)
    a = ly["attn"]
    t[p + "attn.c_attn.weight"] = np.concatenate([a[f"{n}_kernel"].reshape(D, D) for n in "qkv"], axis=1)
    t[p + "attn.c_attn.bias"] = np.concatenate([a[f"{n}_bias"].reshape(D) for n in "qkv"])
    t[p + "attn.c_proj.weight"] = a["o_kernel"].reshape(D, D)
    t[p + "attn.c_proj.bias"] = a["o_bias"]
    t[p + "ln_1.weight"], t[p + "ln_1.bias"] = ly["attn_norm"]["scale"], ly["attn_norm"]["bias"]
    t[p + "ln_2.weight"], t[p + "ln_2.bias"] = ly["mlp_norm"]["scale"], ly["mlp_norm"]["bias"]
    t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = ly["mlp"]["wi_kernel"], ly["mlp"]["wi_bias"]
    t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = ly["mlp"]["wo_kernel"], ly["mlp"]["wo_bias"]
  # Keep what an imported model's config said beyond the architecture (token ids, task params ...).
  hf_cfg = family.base_hf_config(base_hf_config)
  if not base_hf_config:
    hf_cfg.update(bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is out of a small vocab
  hf_cfg.update({
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
      "n_positions": cfg.max_seq_len, "n_embd": D, "n_layer": L, "n_head": cfg.num_heads,
      "n_inner": None if cfg.mlp_dim == 4 * D else cfg.mlp_dim, "activation_function": "gelu_new",
      "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False, "add_cross_attention": False,
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      "dtype": str(jax.tree.leaves(params)[0].dtype)})
  return hf_cfg, {k: np.ascontiguousarray(v) for k, v in t.items()}


FAMILY = family.Family(kind="hf_gpt2", title="GPT-2", hf_class="GPT2LMHeadModel", read=read_hf,
                       config=model_config_from_hf, layers=hf_layers, to_hf=to_hf)
import_hf = functools.partial(family.import_hf, FAMILY)
export_hf = functools.partial(family.export_hf, FAMILY)
train_overrides = family.train_overrides
main = functools.partial(family.main, FAMILY)


if __name__ == "__main__":
  from ztt_jax import cli
  family.define_flags(FAMILY)
  cli.run(main)
