"""What a data path holds, in a form a checkpoint can keep: the resume check compares it.

A resume that compared only `data.path` would continue on whatever the path holds now: a corpus
that lost a file, or a token file rewritten in place, silently becomes a different run with a
different held-out tail. The fingerprint is cheap to take at any corpus size (no content hash):

- text: every file (relative name, bytes, mtime) and the token count of the corpus;
- tokens: the file's bytes and mtime, and its token count;
- array_record: every file's bytes, mtime and record count.

The embedded tasks have no files: their data is the config itself, which resume.py compares.
A changed file list, size or count means different data; a changed mtime alone may be a copy or a
`touch`, so it is only reported (see `differences`).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ztt_jax.data import sources, text
from ztt_jax.data.config import DataConfig
from ztt_jax.data.tokenizer import load_tokenizer


def _files(root: str, paths) -> dict:
  """relative name -> [bytes, mtime_ns]."""
  base = root if os.path.isdir(root) else os.path.dirname(root)
  out = {}
  for p in map(str, paths):
    st = os.stat(p)
    out[os.path.relpath(p, base) if base else p] = [int(st.st_size), int(st.st_mtime_ns)]
  return out


def _array_record_count(path: str) -> int:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return int(reader.num_records())
  finally:
    reader.close()


def fingerprint(data_cfg) -> Optional[dict]:
  """The fingerprint of what `data_cfg.path` holds now; None for the embedded tasks.

  For text this reads (or, like opening the data does, builds) the token cache for the count."""
  cfg = DataConfig.from_any(data_cfg)
  if cfg.kind == "text":
    files = text.list_text_files(cfg.path)
    cache = text.build_token_cache(cfg.path, load_tokenizer(cfg.tokenizer), cfg.cache_dir)
    return {"kind": "text", "files": _files(cfg.path, files), "tokens": int(cache.num_tokens)}
  if cfg.kind == "tokens":
    n = os.path.getsize(cfg.path) // np.dtype(cfg.token_dtype).itemsize
    return {"kind": "tokens", "files": _files(cfg.path, [cfg.path]), "tokens": int(n)}
  if cfg.kind == "array_record":
    files = sources.array_record_files(cfg.path)
    return {"kind": "array_record", "files": _files(cfg.path, files),
            "records": {name: _array_record_count(f) for name, f in zip(_files(cfg.path, files), files)}}
  return None


def _size(n: int) -> str:
  return f"{n:,} bytes"


def differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """(changes that make it different data, changes that may not: mtimes), each a short phrase."""
  fatal, maybe = [], []
  old_files, new_files = old.get("files", {}), new.get("files", {})
  for name in sorted(set(old_files) - set(new_files)):
    fatal.append(f"{name} is gone ({_size(old_files[name][0])})")
  for name in sorted(set(new_files) - set(old_files)):
    fatal.append(f"{name} is new ({_size(new_files[name][0])})")
  for name in sorted(set(old_files) & set(new_files)):
    (s0, m0), (s1, m1) = old_files[name], new_files[name]
    if s0 != s1:
      fatal.append(f"{name} changed size: {s0:,} -> {s1:,} bytes")
    elif m0 != m1:
      maybe.append(f"{name} was modified (same size)")
  for count in ("tokens",):
    if count in old and count in new and old[count] != new[count]:
      fatal.append(f"{count}: {old[count]:,} -> {new[count]:,}")
  old_rec, new_rec = old.get("records", {}), new.get("records", {})
  for name in sorted(set(old_rec) & set(new_rec)):
    if old_rec[name] != new_rec[name]:
      fatal.append(f"{name} records: {old_rec[name]:,} -> {new_rec[name]:,}")
  return fatal, maybe
