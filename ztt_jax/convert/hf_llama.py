"""Hugging Face Llama (LlamaForCausalLM) <-> ztt_jax exports.

  python -m ztt_jax.convert.hf_llama --hf_dir=HF_DIR --out=DIR --to=vanilla
  python -m ztt_jax.convert.hf_llama --hf_dir=HF_DIR --out=DIR --to=ztt [--num_cycles=2]
      [--n_middle_layers=k] [--middle_init=copy|average] [--lora_rank=r] [--zero_bias_init=-10]
  python -m ztt_jax.convert.hf_llama --export_hf --from=DIR --out=HF_DIR   # a vanilla Llama-form export

Same interface, output safety and layout folding as hf_gpt2 (`family`, `fold`, `hf_io`).

Llama form: norm=rmsnorm (eps rms_norm_eps), position=rope (rope_theta, rotate-half, the same
convention as HF's), mlp=swiglu, use_bias=False, num_kv_heads=num_key_value_heads, tied or untied
head. HF Linear weights are [out, in], ours [in, out]:
  embed_tokens -> embed/embedding, norm -> final_norm/scale, lm_head^T -> embed/lm_head (untied)
  layers.i.input_layernorm -> attn_norm/scale, post_attention_layernorm -> mlp_norm/scale
  self_attn.{q,k,v}_proj^T -> attn/{q,k,v}_kernel [D, heads, K] (k, v: the kv heads)
  self_attn.o_proj^T -> attn/o_kernel [H, K, D]
  mlp.gate_proj^T -> mlp/wg_kernel, mlp.up_proj^T -> mlp/wi_kernel, mlp.down_proj^T -> mlp/wo_kernel
What the model cannot compute is refused naming the config.json field: rope scaling, sliding
windows, attention/MLP biases (Qwen2's q/k/v biases included: the model's use_bias would add o and
MLP biases that a Qwen2 directory cannot hold after fine-tuning), other activations and architectures.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from ztt_jax.convert import ConvertError, family, hf_io
from ztt_jax.model import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM",)


def read_hf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {name without 'model.': float32 array}); shards via the index."""
  return hf_io.read(path, prefix="model.", ignored_suffixes=(".rotary_emb.inv_freq",))


def rope_theta(hf_cfg: dict) -> float:
  """rope_theta from config.json: transformers 5 keeps it in rope_parameters, older files at the top
  level beside rope_scaling; only the default (unscaled) RoPE maps."""
  rp = hf_cfg.get("rope_parameters") or {}
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind != "default":
    raise ConvertError(f"config.json rope_parameters.rope_type={kind!r} is not supported: the model has "
                       "plain RoPE only (no scaling); use a checkpoint with rope_type 'default'.")
  if hf_cfg.get("rope_scaling"):
    raise ConvertError(f"config.json rope_scaling={hf_cfg['rope_scaling']!r} is not supported: the model has "
                       "plain RoPE only; use a checkpoint with rope_scaling null.")
  return float(rp.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_cfg: dict, dtype: str = "float32") -> ModelConfig:
  """The `vanilla` ModelConfig equal to a Llama config; refuses what the model can't express."""
  def need(key, ok, fix):
    if not ok:
      raise ConvertError(f"config.json {key}={hf_cfg.get(key)!r} is not supported: {fix}")

  archs = hf_cfg.get("architectures") or list(ARCHITECTURES)
  need("architectures", all(a in ARCHITECTURES for a in archs),
       f"this converter reads {', '.join(ARCHITECTURES)} (GPT-2: ztt_jax.convert.hf_gpt2).")
  need("model_type", hf_cfg.get("model_type", "llama") == "llama", "only Llama (model_type 'llama') converts here.")
  need("hidden_act", hf_cfg.get("hidden_act", "silu") == "silu", "the model's SwiGLU gate is silu.")
  need("attention_bias", not hf_cfg.get("attention_bias", False), "Llama form has no attention biases.")
  need("mlp_bias", not hf_cfg.get("mlp_bias", False), "Llama form has no MLP biases.")
  need("sliding_window", not hf_cfg.get("sliding_window"), "no sliding window in a Llama import.")
  need("attention_dropout", not hf_cfg.get("attention_dropout", 0.0), "must be 0 (the model has no dropout).")
  for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
              "max_position_embeddings"):
    need(key, isinstance(hf_cfg.get(key), int) and hf_cfg[key] > 0, "must be a positive integer.")
  D, H = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
  need("hidden_size", D % H == 0, "must be divisible by num_attention_heads.")
  need("head_dim", hf_cfg.get("head_dim") in (None, D // H),
       f"the model's head_dim is hidden_size / num_attention_heads = {D // H}.")
  G = hf_cfg.get("num_key_value_heads") or H
  need("num_key_value_heads", isinstance(G, int) and H % G == 0, "must divide num_attention_heads.")
  return ModelConfig(
      variant="vanilla", num_cycles=1, n_head_layers=0, n_middle_layers=hf_cfg["num_hidden_layers"],
      n_tail_layers=0, vocab_size=hf_cfg["vocab_size"], d_model=D, num_heads=H,
      num_kv_heads=None if G == H else G, mlp_dim=hf_cfg["intermediate_size"],
      max_seq_len=hf_cfg["max_position_embeddings"], norm="rmsnorm", norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)),
      position="rope", rope_theta=rope_theta(hf_cfg), mlp="swiglu", use_bias=False,
      tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)), param_dtype=dtype).validate()


def _take(tensors: dict, name: str, shape: tuple) -> np.ndarray:
  return family.take(tensors, name, shape, architecture="LlamaForCausalLM", prefix="model.",
                     fix="Fix config.json (vocab_size, hidden_size, intermediate_size or the head counts).")


def hf_layers(cfg: ModelConfig, tensors: dict) -> tuple[dict, list[dict]]:
  """(non-layer params, [per-layer block params]); consumes `tensors`, leftovers are an error."""
  D, H, G, K, F, V = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  tensors = dict(tensors)
  top = {"embed": {"embedding": _take(tensors, "embed_tokens.weight", (V, D))},
         "final_norm": {"scale": _take(tensors, "norm.weight", (D,))}}
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)  # a copy of embed_tokens when tied
  else:
    top["embed"]["lm_head"] = _take(tensors, "lm_head.weight", (V, D)).T.copy()
  layers = []
  for i in range(cfg.n_middle_layers):
    p = f"layers.{i}."
    lin = lambda n, out, inp, p=p: _take(tensors, p + n + ".weight", (out, inp)).T  # noqa: E731
    layers.append({
        "attn_norm": {"scale": _take(tensors, p + "input_layernorm.weight", (D,))},
        "attn": {"q_kernel": lin("self_attn.q_proj", H * K, D).reshape(D, H, K),
                 "k_kernel": lin("self_attn.k_proj", G * K, D).reshape(D, G, K),
                 "v_kernel": lin("self_attn.v_proj", G * K, D).reshape(D, G, K),
                 "o_kernel": lin("self_attn.o_proj", D, H * K).reshape(H, K, D)},
        "mlp_norm": {"scale": _take(tensors, p + "post_attention_layernorm.weight", (D,))},
        "mlp": {"wg_kernel": lin("mlp.gate_proj", F, D), "wi_kernel": lin("mlp.up_proj", F, D),
                "wo_kernel": lin("mlp.down_proj", D, F)},
    })
  family.refuse_leftovers(tensors, "Llama", "num_hidden_layers")
  return top, layers


def to_hf(cfg: ModelConfig, params: dict, base_hf_config: Optional[dict] = None) -> tuple[dict, dict]:
  """(config.json dict, {HF tensor name: numpy array}) of a vanilla Llama-form model."""
  family.check_form(cfg, "Llama", dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False),
                    {"token_shift=True (Llama has no token shift)": cfg.token_shift,
                     f"attention_window={cfg.attention_window} (Llama has no sliding window)":
                         cfg.attention_window is not None})
  layers, L = family.vanilla_layers(jax.tree.map(np.asarray, params))
  D, H, G, K = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  t = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = params["embed"]["lm_head"].T
  for i in range(L):
    p, ly = f"model.layers.{i}.", jax.tree.map(lambda a, i=i: a[i], layers)
    a, m = ly["attn"], ly["mlp"]
    t[p + "input_layernorm.weight"] = ly["attn_norm"]["scale"]
    t[p + "post_attention_layernorm.weight"] = ly["mlp_norm"]["scale"]
    t[p + "self_attn.q_proj.weight"] = a["q_kernel"].reshape(D, H * K).T
    t[p + "self_attn.k_proj.weight"] = a["k_kernel"].reshape(D, G * K).T
    t[p + "self_attn.v_proj.weight"] = a["v_kernel"].reshape(D, G * K).T
    t[p + "self_attn.o_proj.weight"] = a["o_kernel"].reshape(H * K, D).T
    t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = m["wg_kernel"].T, m["wi_kernel"].T
    t[p + "mlp.down_proj.weight"] = m["wo_kernel"].T
  hf_cfg = family.base_hf_config(base_hf_config)
  for stale in ("rope_scaling", "rope_theta"):
    hf_cfg.pop(stale, None)
  if not base_hf_config:
    hf_cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
  hf_cfg.update({
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
      "hidden_size": D, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": L, "num_attention_heads": H,
      "num_key_value_heads": G, "head_dim": K, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": str(jax.tree.leaves(params)[0].dtype)})
  return hf_cfg, {k: np.ascontiguousarray(v) for k, v in t.items()}


FAMILY = family.Family(kind="hf_llama", title="Llama", hf_class="LlamaForCausalLM", read=read_hf,
                       config=model_config_from_hf, layers=hf_layers, to_hf=to_hf)
import_hf = functools.partial(family.import_hf, FAMILY)
export_hf = functools.partial(family.export_hf, FAMILY)
main = functools.partial(family.main, FAMILY)


if __name__ == "__main__":
  from ztt_jax import cli
  family.define_flags(FAMILY, lora=True)
  cli.run(main)
