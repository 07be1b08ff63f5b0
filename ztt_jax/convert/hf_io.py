"""A Hugging Face model directory (config.json + model.safetensors, or shards named by
model.safetensors.index.json), read and written for any model family; no torch, no network.

`write` never destroys what it did not write (ztt_jax.outdir): an existing non-empty --out needs
--overwrite and is replaced only if an earlier `write` made it. Hugging Face's config.json is not
ours to recognise a directory by, so `write` leaves the marker file ztt_jax_export_hf.json beside
it. --out may not be or lie inside its input, and the directory is swapped in atomically (on an
object store: the marker file uploaded last, see ztt_jax.outdir). --hf_dir may be a URL: it is read
through a local copy (storage.local_copy), as safetensors reads local files.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from ztt_jax import export as export_lib
from ztt_jax import outdir
from ztt_jax import storage
from ztt_jax.convert import ConvertError

MARKER = "ztt_jax_export_hf.json"
MARKER_FORMAT = "ztt_jax.export_hf"
ENTRIES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


def read(hf_dir: str, prefix: str = "", ignored_suffixes: tuple = ()) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {tensor name without `prefix`: float32 array}); tensors whose name ends
  in one of `ignored_suffixes` are skipped."""
  hf_dir = storage.absolute(hf_dir)
  if storage.is_url(hf_dir) and storage.isdir(hf_dir):
    export_lib.refuse_unfinished(hf_dir, "Hugging Face export", "Rerun the --export_hf (with --overwrite).",
                                 ConvertError)
    hf_dir = storage.local_copy(hf_dir)
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir} is not a directory. Point it at a local Hugging Face model "
                       "directory (config.json + model.safetensors), e.g. one written by save_pretrained.")
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConvertError(f"{hf_dir} has no config.json; it is not a Hugging Face model directory.")
  with open(cfg_path) as f:
    try:
      hf_cfg = json.load(f)
    except ValueError as e:
      raise ConvertError(f"{cfg_path} is not valid JSON ({e}).") from None
  from safetensors import safe_open
  tensors = {}
  for file in _weight_files(hf_dir):
    try:
      with safe_open(file, "numpy") as f:
        for name in f.keys():
          if name.endswith(tuple(ignored_suffixes)):
            continue
          key = name[len(prefix):] if prefix and name.startswith(prefix) else name
          tensors[key] = np.asarray(f.get_tensor(name)).astype(np.float32)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
      raise ConvertError(f"{file} cannot be read as safetensors ({type(e).__name__}: {e}).") from None
  return hf_cfg, tensors


def _weight_files(hf_dir: str) -> list[str]:
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      return sorted({os.path.join(hf_dir, v) for v in json.load(f)["weight_map"].values()})
  bin_hint = (" It has pytorch_model.bin: re-save it as safetensors with "
              "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)` (transformers writes "
              "safetensors by default)." if os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")) else "")
  raise ConvertError(f"{hf_dir} has no model.safetensors (nor model.safetensors.index.json).{bin_hint}")


def is_ours(path: str) -> Optional[str]:
  """None if `path` was written by `write` and holds nothing else, else why not."""
  return export_lib.is_marked(path, MARKER, MARKER_FORMAT, ENTRIES)


def write(out: str, build: Callable[[], tuple[dict, dict, Optional[str]]], *, source: str,
          overwrite: bool = False) -> str:
  """Writes `out`/config.json + `out`/model.safetensors (+ tokenizer.json) atomically, from what
  `build()` returns: (config.json dict, {HF tensor name: array}, tokenizer.json path or None).

  `source` (the export read, flag --from) may not be `out` or lie inside it. `out` is checked before
  `build` runs and again after (building loads the export, which takes a while), so a stale
  tokenizer.json is never left behind and a directory that is not ours is never replaced."""
  check = dict(overwrite=overwrite, is_ours=is_ours, sources={"--from": source}, what="a Hugging Face export")
  outdir.check(out, **check)
  hf_cfg, tensors, tokenizer = build()

  def fill(tmp):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    if tokenizer and storage.isfile(tokenizer):
      storage.copy(tokenizer, os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump({"format": MARKER_FORMAT, "version": 1, "from": storage.absolute(source)}, f, indent=2)

  return outdir.write_atomic(outdir.check(out, **check), fill, marker=MARKER, fmt=MARKER_FORMAT)
