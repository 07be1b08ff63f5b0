"""What every Hugging Face family's converter shares: import to an export, export back, and the CLI.

A family (hf_gpt2.py, hf_llama.py) is one `Family`: how to read its directory, its config.json ->
ModelConfig, its tensors -> (non-layer params, per-layer block params), and the way back. Folding
the layers into the vanilla or ZTT layout is `fold`, reading and writing the directory `hf_io`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import numpy as np

from ztt_jax import export as export_lib
from ztt_jax import storage as paths
from ztt_jax.convert import ConvertError, fold, hf_io


@dataclasses.dataclass(frozen=True)
class Family:
  kind: str          # the export's source.kind, e.g. "hf_gpt2"
  title: str         # for messages, e.g. "GPT-2"
  hf_class: str      # the transformers class that loads an --export_hf directory
  read: Callable     # hf_dir -> (config.json dict, {name: float32 array})
  config: Callable   # config.json dict -> vanilla ModelConfig (refuses what the model can't express)
  layers: Callable   # (cfg, tensors) -> (top params, [per-layer block params])
  to_hf: Callable    # (cfg, params, base config.json or None) -> (config.json dict, {name: array})


def import_hf(family: Family, hf_dir: str, out: str, to: str = "vanilla", num_cycles: int = 2,
              n_middle_layers: Optional[int] = None, middle_init: str = "copy", zero_bias_init: float = -10.0,
              storage: str = "safetensors", dtype: str = "float32", overwrite: bool = False,
              lora_rank: int = 0) -> str:
  """Converts a local HF directory of `family` to an export at `out`.

  `out` follows `ztt_jax.export.save`'s rules: never the HF directory itself (or inside it), and an
  existing non-empty `out` only with `overwrite` and only if it is an export written by ztt_jax."""
  sources = {"--hf_dir": hf_dir}
  export_lib.check_out(out, overwrite=overwrite, sources=sources)  # before reading the weights
  hf_cfg, tensors = family.read(hf_dir)
  cfg = family.config(hf_cfg)
  top, layers = family.layers(cfg, tensors)
  ztt_kw = dict(num_cycles=num_cycles, n_middle_layers=n_middle_layers, middle_init=middle_init,
                zero_bias_init=zero_bias_init)
  if lora_rank:
    ztt_kw["lora_rank"] = lora_rank
  cfg, params = fold.fold(to, cfg, top, layers, **ztt_kw)
  source = {"kind": family.kind, "hf_dir": paths.absolute(hf_dir), "to": to, "hf_config": hf_cfg}
  if to == "ztt":
    source.update(middle_init=middle_init, num_cycles=num_cycles, n_middle_layers=cfg.n_middle_layers,
                  zero_bias_init=zero_bias_init, lora_rank=lora_rank)
  tok = paths.join(hf_dir, "tokenizer.json")
  # Copied so fine-tuning can use the model's own tokenizer (data.tokenizer); inside the atomic write.
  extra = {"tokenizer.json": tok} if paths.isfile(tok) else {}
  return export_lib.save(out, cfg, params, storage=storage, dtype=dtype, source=source, overwrite=overwrite,
                         sources=sources, extra_files=extra)


def export_hf(family: Family, export_path: str, out: str, overwrite: bool = False) -> str:
  """Writes `out`/config.json + `out`/model.safetensors (+ tokenizer.json) from the vanilla export at
  `export_path` (see `hf_io.write` for what an existing `out` may be)."""
  def build():
    model, params = export_lib.load(export_path)
    base = export_lib.read_config(export_path).get("source", {}).get("hf_config")
    hf_cfg, tensors = family.to_hf(model.cfg, params, base)
    return hf_cfg, tensors, paths.join(paths.absolute(export_path), "tokenizer.json")

  return hf_io.write(out, build, source=export_path, overwrite=overwrite)


def check_form(cfg, family_name: str, form: dict, extra: dict) -> None:
  """ConvertError unless `cfg` is a vanilla model of the family's form: `form` {field: value} of
  ModelConfig, and `extra` {what the family lacks: whether cfg has it}, e.g. {"token_shift=True": ...}."""
  fix = (f"Train or convert with --config.model.variant=vanilla, "
         + ", ".join(f"{k}={v}" for k, v in form.items()) + ".")
  problems = ([f"variant={cfg.variant!r}, zero_token={cfg.use_zero_token}"]
              if cfg.canonical_variant != "vanilla" or cfg.use_zero_token else [])
  problems += [f"{k}={getattr(cfg, k)!r}" for k, v in form.items() if getattr(cfg, k) != v]
  problems += [what for what, present in extra.items() if present]
  if problems:
    raise ConvertError(f"only a vanilla {family_name}-form model exports to Hugging Face {family_name}: "
                       f"{problems[0]}. {fix}")


def vanilla_layers(params: dict) -> tuple[dict, int]:
  """(every layer's params stacked in order, the layer count) of a vanilla model: head, middle, tail."""
  stacks = [params[s]["layers"] for s in ("head", "middle", "tail") if s in params]
  layers = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *stacks)
  return layers, jax.tree.leaves(layers)[0].shape[0]


def take(tensors: dict, name: str, shape: tuple, *, architecture: str, prefix: str, fix: str = "") -> np.ndarray:
  """Pops one HF tensor of the expected shape; ConvertError naming it (and `fix`) otherwise."""
  if name not in tensors:
    raise ConvertError(f"the safetensors have no tensor {name!r} (with or without the {prefix!r} prefix); "
                       f"is it a {architecture} checkpoint?")
  a = tensors.pop(name)
  if a.shape != tuple(shape):
    raise ConvertError(f"tensor {name!r} has shape {a.shape}, config.json implies {tuple(shape)}. {fix}".rstrip())
  return a


def refuse_leftovers(tensors: dict, family_name: str, layer_count_field: str) -> None:
  if tensors:
    raise ConvertError(f"the safetensors have tensors this {family_name} mapping does not know: "
                       f"{sorted(tensors)[:8]}{' ...' if len(tensors) > 8 else ''}. Is config.json's "
                       f"{layer_count_field} right?")


def base_hf_config(base: Optional[dict]) -> dict:
  """What an imported model's config.json said beyond the architecture (token ids, task params ...)."""
  return {k: v for k, v in (base or {}).items()
          if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}


def train_overrides(path: str) -> str:
  """The --config.model.* flags that make a training config match an export (for init_from)."""
  meta = export_lib.read_config(path)
  # Every field that shapes the params or the function, whatever the user's config file sets;
  # run-time choices (remat, compute dtype, exit rule, deep supervision) stay the user's.
  runtime = ("remat_policy", "dtype", "exit_threshold", "min_cycles", "exit_granularity", "cycle_loss_weight")
  flags = [f"--config.model.{k}={v}" for k, v in meta["model"].items() if k not in runtime and v is not None]
  return " ".join(flags + [f"--config.init_from={paths.absolute(path)}"])


def main(family: Family, argv) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  if f.export_hf:
    if not f["from"].value:
      raise ConvertError(f"--export_hf needs --from=EXPORT_DIR (a vanilla {family.title}-form export).")
    out = export_hf(family, f["from"].value, f.out, overwrite=f.overwrite)
    print(f"wrote Hugging Face {family.title} {out} (load with transformers.{family.hf_class}.from_pretrained)")
    return
  if not f.hf_dir:
    raise ConvertError("give --hf_dir=HF_DIR to import, or --export_hf --from=EXPORT_DIR to export.")
  lora = f.lora_rank if "lora_rank" in f else 0
  out = import_hf(family, f.hf_dir, f.out, f.to, f.num_cycles, f.n_middle_layers, f.middle_init, f.zero_bias_init,
                  f.format, f.dtype, overwrite=f.overwrite, lora_rank=lora)
  print(f"wrote {out}\nfine-tune with: python -m ztt_jax.train --config=configs/finetune.py:{out} "
        f"--workdir=RUN --config.data.path=TEXT\n  (or any config plus: {train_overrides(out)})")


def define_flags(family: Family, lora: bool = False) -> None:
  from absl import flags
  flags.DEFINE_string("hf_dir", None, f"Local Hugging Face {family.title} directory (config.json + "
                      "model.safetensors, or shards with model.safetensors.index.json).")
  flags.DEFINE_string("out", None, "Directory to write.", required=True)
  flags.DEFINE_enum("to", "vanilla", ["vanilla", "ztt"], "Import as a vanilla model or as a ZTT.")
  flags.DEFINE_integer("num_cycles", 2, "--to=ztt: cycles of the shared middle stack.")
  flags.DEFINE_integer("n_middle_layers", None, "--to=ztt: k, layers in the shared stack; default "
                       "(n_layer - 2) // num_cycles.")
  flags.DEFINE_enum("middle_init", "copy", list(fold.MIDDLE_INITS),
                    "--to=ztt: copy the first k middle layers, or average k consecutive groups of them.")
  flags.DEFINE_float("zero_bias_init", -10.0, "--to=ztt: initial zero-slot logit bias (a0 ~ e^bias).")
  if lora:
    flags.DEFINE_integer("lora_rank", 0, "--to=ztt --middle_init=average: per-cycle LoRA of this rank on the "
                         "shared layers (model.cycle_lora_rank), initialised from a truncated SVD of each "
                         "original layer minus the shared average. 0: none.")
  flags.DEFINE_enum("format", "safetensors", list(export_lib.STORAGES), "Storage of the export.")
  flags.DEFINE_enum("dtype", "float32", list(export_lib.DTYPES), "Param dtype of the export.")
  flags.DEFINE_bool("export_hf", False, "Export --from (a vanilla export) to a Hugging Face directory --out.")
  flags.DEFINE_string("from", None, "--export_hf: the export directory to convert.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out, if ztt_jax wrote it (an export, or "
                    "an --export_hf directory) and it holds nothing else.")
