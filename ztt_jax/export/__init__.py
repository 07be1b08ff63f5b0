"""Params-only checkpoints: the format, `save` and `load`. It depends on the model only, so
training (init_from), conversion and loading need no training machinery. Exporting a training
run's checkpoint is `restore.export_run`, on the command line `python -m ztt_jax.export
--workdir=DIR --out=PATH` (ztt_jax/export/__main__.py).

An export is a directory:

  PATH/config.json          {"format": "ztt_jax.params", "version": 1, "model": {ModelConfig fields},
                             "storage": "safetensors" | "orbax", "unscanned": bool, "dtype": ...,
                             "source": {where it came from}}
  PATH/params.safetensors   storage=safetensors: one tensor per param leaf, named by its tree path
                            joined with "/" (e.g. "middle/layers/attn/q_kernel"); the header's
                            metadata repeats config.json under "ztt_jax_config", so the file alone
                            is loadable too
  PATH/params/              storage=orbax: an Orbax PyTree checkpoint of the same tree

Scanned (the default), each layer stack is stored as in training: one tensor per param with a
leading 'layers' axis. `--unscan` stores each layer of a stack under its own name instead
(`middle/layers_0/attn/q_kernel`, `middle/layers_1/...`), the layout most other tools expect;
`load` stacks them back. The zero-key and zero-bias pools stay as they are ([cycles, layers, ...]).

PATH may be a URL (gs://...): the export is built locally and uploaded with its config.json last
(ztt_jax.outdir: a prefix holding outdir.WRITING is unfinished and refused by `load`).

`load(PATH)` needs no training config: it rebuilds `ZTTModel` from config.json and returns
`(model, params)` with params unboxed (numpy arrays) in the training tree. It checks every tensor
against the shapes the config implies, so a damaged or mismatched export fails with a message
instead of producing a wrong model.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ztt_jax import outdir
from ztt_jax import storage as paths
from ztt_jax.errors import CheckpointError, ConfigError
from ztt_jax.model import ModelConfig, ZTTModel

FORMAT = "ztt_jax.params"
VERSION = 1
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "params.safetensors"
ORBAX_DIR = "params"
STORAGES = ("safetensors", "orbax")
DTYPES = ("float32", "bfloat16")
STACKS = ("head", "middle", "tail")
_UNSCANNED = re.compile(r"^layers_(\d+)$")


class ExportError(CheckpointError):
  """An export is missing, damaged, or does not fit its config."""


# ------------------------------------------------------------------ tree helpers

def unscan(params: dict) -> dict:
  """Splits each stack's 'layers' subtree [L, ...] into 'layers_0' ... 'layers_{L-1}'."""
  out = dict(params)
  for stack in STACKS:
    if stack in out and "layers" in out[stack]:
      sub = dict(out[stack])
      layers = sub.pop("layers")
      n = jax.tree.leaves(layers)[0].shape[0]
      for i in range(n):
        sub[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
      out[stack] = sub
  return out


def rescan(params: dict) -> dict:
  """Inverse of `unscan`: stacks 'layers_<i>' subtrees back onto a leading 'layers' axis."""
  out = dict(params)
  for stack in STACKS:
    if stack not in out:
      continue
    sub = dict(out[stack])
    idx = sorted(int(m.group(1)) for k in sub if (m := _UNSCANNED.match(k)))
    if not idx:
      continue
    if idx != list(range(len(idx))):
      raise ExportError(f"unscanned export: {stack}/ holds layers {idx}, expected 0..{len(idx) - 1}; "
                        "the export is damaged. Export it again.")
    layers = [sub.pop(f"layers_{i}") for i in idx]
    try:
      sub["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    except ValueError as e:
      raise ExportError(f"unscanned export: the layers of {stack}/ do not hold the same params ({e}); "
                        "the export is damaged. Export it again.") from None
    out[stack] = sub
  return out


def abstract_params(cfg: ModelConfig) -> dict:
  """Unboxed ShapeDtypeStruct tree of the model's params (no compile, no memory)."""
  import flax.linen as nn
  model = ZTTModel(cfg)
  return jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))


def cast(params: Any, dtype: str) -> Any:
  if dtype not in DTYPES:
    raise ConfigError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
  return jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), params)


# ------------------------------------------------------------------ save

def save(path: str, model_cfg: Any, params: Any, *, storage: str = "safetensors", unscanned: bool = False,
         dtype: Optional[str] = None, source: Optional[dict] = None, overwrite: bool = False,
         sources: Optional[dict] = None, extra_files: Optional[dict] = None) -> str:
  """Writes an export of `params` (unboxed, host or device arrays) for `model_cfg` to directory `path`.

  dtype: cast every param to float32 or bfloat16 (None keeps them); the embedded config's
  param_dtype follows, so `load` builds a model that matches the stored params.
  The export is written next to `path` and swapped into place (ztt_jax.outdir), so an interrupted
  save never leaves a half-written export under `path`. An existing non-empty `path` is refused
  unless `overwrite`, and even then only an export written here (and nothing else) is replaced.
  sources: {flag: path} of the inputs, which `path` may not be or lie inside (nor they inside it).
  extra_files: {name: file} copied into the export (e.g. an imported model's tokenizer.json).
  """
  path = check_out(path, overwrite=overwrite, sources=sources)
  if storage not in STORAGES:
    raise ConfigError(f"format={storage!r}: use one of {', '.join(STORAGES)}")
  cfg = ModelConfig.from_any(model_cfg)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  _check_tree(params, abstract_params(cfg), f"params for {path}", any_dtype=True)
  if dtype is not None:
    params = cast(params, dtype)
  leaf_dtypes = {str(a.dtype) for a in jax.tree.leaves(params)}
  if len(leaf_dtypes) != 1 or next(iter(leaf_dtypes)) not in DTYPES:
    raise ConfigError(f"params have dtypes {sorted(leaf_dtypes)}; pass dtype='float32' or 'bfloat16' "
                      "to store them in one supported dtype.")
  param_dtype = next(iter(leaf_dtypes))
  cfg = cfg.replace(param_dtype=param_dtype)
  meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), "storage": storage,
          "unscanned": bool(unscanned), "dtype": param_dtype, "source": source or {}}
  tree = unscan(params) if unscanned else params

  def fill(tmp):
    if storage == "safetensors":
      from safetensors.numpy import save_file
      flat = {k: np.ascontiguousarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
      save_file(flat, os.path.join(tmp, SAFETENSORS_FILE), metadata={"ztt_jax_config": json.dumps(meta)})
    else:
      import orbax.checkpoint as ocp
      with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, ORBAX_DIR), tree)
    for name, file in (extra_files or {}).items():
      paths.copy(file, os.path.join(tmp, name))
    # config.json last: its presence marks a complete export.
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)

  return outdir.write_atomic(path, fill, marker=CONFIG_FILE, fmt=FORMAT)


# What an export directory may hold; anything else there is the user's, so --overwrite keeps off it.
EXPORT_ENTRIES = (CONFIG_FILE, SAFETENSORS_FILE, ORBAX_DIR, "tokenizer.json")


def is_export(path: str) -> Optional[str]:
  """None if `path` is an export written by `save` holding nothing else, else why not."""
  return is_marked(path, CONFIG_FILE, FORMAT, EXPORT_ENTRIES)


def is_marked(path: str, marker: str, fmt: str, entries) -> Optional[str]:
  """None if `path` holds the JSON file `marker` with {"format": fmt} and nothing but `entries`,
  else why not: how any directory ztt_jax writes is told apart from one --overwrite must keep.
  An interrupted write of the same writer to an object store (outdir.WRITING naming `fmt`) is ours too."""
  writing = outdir.unfinished(path)
  if writing is not None:
    if writing.get("format") != fmt:
      return f"its {outdir.WRITING} names format {writing.get('format')!r}, not {fmt!r}"
    return outdir.only_known_entries(path, entries)
  try:
    got = json.loads(paths.read_text(paths.join(path, marker))).get("format")
  except (OSError, ValueError, AttributeError):
    return f"it has no {marker} with format {fmt!r}"
  if got != fmt:
    return f"its {marker} has format {got!r}, not {fmt!r}"
  return outdir.only_known_entries(path, entries)


def refuse_unfinished(path: str, what: str, rerun: str, error=None) -> None:
  """One-line error if a write to `path` (an object store's prefix) was interrupted or is under way."""
  writing = outdir.unfinished(path)
  if writing is not None:
    by = (f" (begun by pid {writing['pid']} on host {writing['host']})" if {"pid", "host"} <= set(writing) else "")
    raise (error or ExportError)(f"{path} is not a finished {what}: it holds {outdir.WRITING}, so writing it was "
                                 f"interrupted or is under way{by}. {rerun}")


def check_out(out: str, *, overwrite: bool = False, sources: Optional[dict] = None) -> str:
  """Absolute `out` if an export may be written there, else OutputError (see ztt_jax.outdir)."""
  return outdir.check(out, overwrite=overwrite, is_ours=is_export, sources=sources or {}, what="an export")


# ------------------------------------------------------------------ load

def read_config(path: str) -> dict:
  """The export's config.json (or the metadata of a bare params.safetensors file)."""
  path = paths.absolute(path)
  if not paths.exists(path):
    raise ExportError(f"No export at {path}. Create one with `python -m ztt_jax.export --workdir=RUN "
                      "--out=PATH` or `python -m ztt_jax.convert.hf_gpt2 --hf_dir=HF --out=PATH`.")
  if paths.isfile(path):
    if not path.endswith(".safetensors"):
      raise ExportError(f"{path} is a file, not an export directory (or a {SAFETENSORS_FILE} file).")
    meta = _safetensors_meta(path)
  else:
    refuse_unfinished(path, "export", "Rerun the export (with --overwrite) to replace it.")
    cfg_path = paths.join(path, CONFIG_FILE)
    if not paths.isfile(cfg_path):
      hint = (" It looks like a training work directory: export it first with "
              f"`python -m ztt_jax.export --workdir={path} --out=NEW_PATH`."
              if paths.isdir(paths.join(path, "checkpoints")) else
              " It looks like a Hugging Face model: convert it first with "
              f"`python -m ztt_jax.convert.hf_gpt2 --hf_dir={path} --out=NEW_PATH`."
              if paths.isfile(paths.join(path, "model.safetensors")) else "")
      raise ExportError(f"{path} is not a ztt_jax export: it has no {CONFIG_FILE} (an export that was "
                        f"interrupted before finishing has none either).{hint}")
    try:
      meta = json.loads(paths.read_text(cfg_path))
    except (OSError, ValueError) as e:
      raise ExportError(f"{cfg_path} is damaged ({e}); export the model again.") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ExportError(f"{path}: {CONFIG_FILE} is not a ztt_jax export config (format "
                      f"{meta.get('format') if isinstance(meta, dict) else None!r}, want {FORMAT!r}).")
  if meta.get("version", 0) > VERSION:
    raise ExportError(f"{path}: export format version {meta['version']} is newer than this ztt_jax "
                      f"reads ({VERSION}); upgrade ztt_jax.")
  if meta.get("storage") not in STORAGES:
    raise ExportError(f"{path}: unknown storage {meta.get('storage')!r} in {CONFIG_FILE}; the export is damaged.")
  return meta


def load(path: str) -> tuple[ZTTModel, dict]:
  """(model, params) of an export directory (or a bare params.safetensors file).

  params: the unboxed training tree of numpy arrays in the stored dtype; an unscanned export is
  stacked back onto the 'layers' axes.
  """
  meta = read_config(path)
  try:
    cfg = ModelConfig.from_any(meta["model"])
  except (KeyError, TypeError, ConfigError) as e:
    raise ExportError(f"{path}: the model config in {CONFIG_FILE} is invalid ({e}).") from None
  path = paths.absolute(path)
  if meta["storage"] == "safetensors":
    file = path if paths.isfile(path) else paths.join(path, SAFETENSORS_FILE)
    tree = traverse_util.unflatten_dict(_read_safetensors(file), sep="/")
  else:
    tree = _read_orbax(paths.join(path, ORBAX_DIR))
  if meta.get("unscanned"):
    tree = rescan(tree)
  _check_tree(tree, abstract_params(cfg), path, any_dtype=False)
  return ZTTModel(cfg), tree


def _safetensors_meta(file: str) -> dict:
  # The header read by hand (8-byte little-endian length, then JSON): safe_open wants a local file.
  try:
    with paths.path(file).open("rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if not 2 <= n <= 100 << 20:
        raise ValueError(f"header length {n}")
      raw = (json.loads(f.read(n)).get("__metadata__") or {}).get("ztt_jax_config")
  except Exception as e:  # noqa: BLE001 - the library raises several types for a bad header
    raise ExportError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); the export "
                      "is damaged or truncated. Export it again.") from None
  if raw is None:
    raise ExportError(f"{file} carries no ztt_jax config in its metadata; load its export directory "
                      "(with config.json) instead.")
  return json.loads(raw)


def _read_safetensors(file: str) -> dict:
  if not paths.isfile(file):
    raise ExportError(f"{file} is missing: the export is incomplete. Export it again.")
  from safetensors.numpy import load, load_file
  try:
    return load(paths.read_bytes(file)) if paths.is_url(file) else load_file(file)
  except Exception as e:  # noqa: BLE001
    raise ExportError(f"{file} cannot be read ({type(e).__name__}: {e}); the export is damaged or "
                      "truncated. Export it again.") from None


def _read_orbax(directory: str) -> dict:
  if not paths.isdir(directory):
    raise ExportError(f"{directory} is missing: the export is incomplete. Export it again.")
  import orbax.checkpoint as ocp
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(directory)
  except Exception as e:  # noqa: BLE001
    raise ExportError(f"{directory} cannot be restored ({type(e).__name__}: {e}); the export is damaged. "
                      "Export it again.") from None
  return jax.tree.map(np.asarray, tree)


def _check_tree(tree: dict, want: dict, where: str, any_dtype: bool) -> None:
  """Every expected tensor present with its shape (and dtype), nothing extra."""
  got_flat, want_flat = traverse_util.flatten_dict(tree, sep="/"), traverse_util.flatten_dict(want, sep="/")
  missing = sorted(set(want_flat) - set(got_flat))
  extra = sorted(set(got_flat) - set(want_flat))
  bad = [f"{k}: {tuple(got_flat[k].shape)} {got_flat[k].dtype}, want {tuple(w.shape)}"
         + ("" if any_dtype else f" {w.dtype}")
         for k, w in want_flat.items() if k in got_flat
         and (tuple(got_flat[k].shape) != tuple(w.shape) or (not any_dtype and got_flat[k].dtype != w.dtype))]
  if missing or extra or bad:
    parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) \
        + ([f"wrong shape/dtype: {'; '.join(bad)}"] if bad else [])
    raise ExportError(f"{where}: the stored params do not match the model config ({', '.join(parts)}). "
                      "The export is damaged or its config.json was edited; export it again.")
