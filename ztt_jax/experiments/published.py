"""What the ablation report may replace: only files it wrote, and never a bigger ladder with a smaller one.

The report writes into OUT/report unless `--docs=DIR` names another directory (the repo's docs/ is
one). A file there is the report's own, and may be replaced, when it carries the report's marker:

- a summary JSON: `"written_by": "ztt_jax.experiments.report"`; one without it but with exactly
  a summary's keys (task, budget, rungs) was written by the report before it had the marker;
- a PNG: a `written_by` tEXt chunk of the same value; a Matplotlib PNG without it was written by an
  earlier report only if the directory's results/ holds a report summary (else it is someone's plot);
- default_vanilla.txt: its fixed first line;
- results.md is never replaced: only the bodies of its `<!-- auto:NAME -->` blocks are, and a
  missing results.md is created holding just the blocks.

A ladder summary (and its results.md block) built from more runs, more seeds or more steps than
the new one is not replaced unless `--overwrite`: a smoke run must not unpublish a real ladder.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import zlib
from typing import Optional

from ztt_jax import storage
from ztt_jax.errors import OutputError

MARKER = "ztt_jax.experiments.report"
_SUMMARY_KEYS = {"task", "budget", "rungs"}
DEFAULT_VANILLA_HEAD = "For comparison, configs/default.py:vanilla"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report_dir(out_dir: str, docs: Optional[str]) -> str:
  """Where the report (and the exit sweeps it reads) go: --docs if given, else OUT/report."""
  return docs if docs else storage.join(out_dir, "report")


def load_json(path: str):
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError):
    return None


def is_summary(obj) -> bool:
  """A ladder summary the report wrote: marked, or (older reports) exactly a summary's keys."""
  if not isinstance(obj, dict):
    return False
  return obj.get("written_by") == MARKER or set(obj) == _SUMMARY_KEYS


def png_text(path: str) -> dict:
  """The tEXt entries of a PNG ({} for anything that is not a PNG)."""
  try:
    data = storage.read_bytes(path)
  except OSError:
    return {}
  if not data.startswith(_PNG_SIGNATURE):
    return {}
  out, i = {}, len(_PNG_SIGNATURE)
  while i + 8 <= len(data):
    n, kind = struct.unpack(">I4s", data[i:i + 8])
    if kind == b"tEXt":
      key, _, value = data[i + 8:i + 8 + n].partition(b"\0")
      out[key.decode("latin-1")] = value.decode("latin-1")
    if kind == b"IEND":
      break
    i += 12 + n
  return out


def stamp_png(path: str) -> None:
  """Adds the report's tEXt marker right after the PNG's header chunk (IHDR, always 13 bytes)."""
  data = storage.read_bytes(path)
  body = b"tEXt" + b"written_by\0" + MARKER.encode("latin-1")
  chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
  end_of_ihdr = len(_PNG_SIGNATURE) + 8 + 13 + 4
  storage.write_bytes(path, data[:end_of_ihdr] + chunk + data[end_of_ihdr:])


def _holds_a_summary(dest: str) -> bool:
  results = storage.join(dest, "results")
  names = storage.listdir(results) if storage.isdir(results) else []
  return any(n.startswith("ladder_") and n.endswith(".json") and is_summary(load_json(storage.join(results, n)))
             for n in names)


def not_ours(path: str, dest: str) -> Optional[str]:
  """None if the existing file `path` was written by the report (see the module docstring), else why not."""
  name = os.path.basename(path)
  if name.endswith(".json"):
    return None if is_summary(load_json(path)) else f"no \"written_by\": \"{MARKER}\" field"
  if name.endswith(".png"):
    text = png_text(path)
    if text.get("written_by") == MARKER:
      return None
    if text.get("Software", "").startswith("Matplotlib") and _holds_a_summary(dest):
      return None
    return f"no written_by={MARKER} PNG text"
  if name == "default_vanilla.txt":
    head = storage.read_bytes(path)[:len(DEFAULT_VANILLA_HEAD)].decode(errors="replace")
    return None if head == DEFAULT_VANILLA_HEAD else "not the report's text"
  return "not a file the report writes"


def ladder_size(summary: dict) -> dict:
  """What a ladder was built from: runs, the most seeds of any rung, steps per run."""
  b = summary.get("budget") or {}
  return {"runs": b.get("runs", 0), "seeds": max((len(r.get("seeds", [])) for r in summary["rungs"].values()), default=0),
          "steps": b.get("steps", 0)}


def block_size(block: str) -> Optional[dict]:
  """`ladder_size` read back from a rendered ladder table (report.ladder_table), None if it is not one."""
  steps, runs = re.search(r"Budget (\d+) steps x", block), re.search(r"; (\d+) runs, ", block)
  if not (steps and runs):
    return None
  seeds = [int(n) for n in re.findall(r"^\| `[^`]+` \| (\d+) \|", block, re.M)]
  return {"runs": int(runs.group(1)), "seeds": max(seeds, default=0), "steps": int(steps.group(1))}


def describe(size: dict) -> str:
  return f"{size['runs']} runs, {size['seeds']} seeds, {size['steps']} steps"


def check_not_smaller(where: str, old: Optional[dict], new: dict, *, overwrite: bool, default_dir: str) -> None:
  """OutputError if `old` (the published ladder at `where`) was built from more than `new`."""
  if old is None or overwrite or not any(old[k] > new[k] for k in new):
    return
  raise OutputError(
      f"{where} holds a ladder of {describe(old)}, more than this report's {describe(new)}; refusing to "
      f"replace it with a smaller one. Report into {default_dir} (leave out --docs), or pass --overwrite "
      "to replace it.")


def check_ours(paths, dest: str) -> None:
  """OutputError naming the first existing file among `paths` that the report did not write."""
  for path in paths:
    if storage.exists(path) or os.path.islink(path):
      why = not_ours(path, dest)
      if why is not None:
        raise OutputError(
            f"{path} exists and was not written by the report ({why}); refusing to replace it, even with "
            "--overwrite. Move it away, or give --docs a directory of the report's own.")


def write_atomic(path: str, write) -> None:
  """write(tmp) then rename over `path`: a crash leaves the old file or the new one, never half of one.
  On an object store tmp is a local file, uploaded as one object (seen whole or not at all)."""
  stem, ext = os.path.splitext(os.path.basename(path))
  url = storage.is_url(path)
  where = tempfile.gettempdir() if url else (os.path.dirname(path) or ".")
  tmp = os.path.join(where, f".{stem}.tmp-{os.getpid()}{ext}")
  try:
    write(tmp)
    if url:
      storage.copy(tmp, path)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
