"""Metric sinks: WORKDIR/metrics.jsonl and TensorBoard, and the flat names of structured metrics."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

from ztt_jax import storage

log = logging.getLogger(__name__)

PER_DIFFICULTY = "eval/per_difficulty"
_DIFFICULTY_NAME = re.compile(r"eval/(?P<metric>accuracy|mean_cycles)_difficulty_(?P<difficulty>\d+)")


class MetricsWriter:
  """One JSON object per logged step (`{"step": s, "train/loss": ...}`), mirrored to TensorBoard.
  The trainer enables it on process 0 only.

  One history per run: `start_step` is the step training continues from (the restored checkpoint's,
  0 for a fresh start). Rows an interrupted run logged past it are dropped from metrics.jsonl, and
  TensorBoard is told to hide the events past it (`purge_step`), since those steps are trained again.

  On an object store (a gs:// workdir), which has no append, the writer keeps the file's rows and
  rewrites the whole object at each write (one upload: a reader sees the old rows or the new ones).
  TensorBoard's event file is written locally and uploaded whole after each flush, the same way.
  (tensorboardX can write gs:// itself, but its writer uploads again when garbage-collected, and
  retries for minutes when the store is gone by then.)
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb = None
    self._rows: list[str] | None = None  # an object store's rows, rewritten whole at each write
    self._tb_sync = None  # (local event dir, its URL) for an object store
    if self.enabled:
      storage.makedirs(workdir)
      truncate_after(self.path, start_step)
      if storage.is_url(self.path):
        self._rows = _lines(self.path) if storage.exists(self.path) else []
      if tensorboard:
        from tensorboardX import SummaryWriter
        # TensorBoard hides every earlier event at a step >= purge_step (its own rule for a crashed
        # and restarted run); the events stay in the old files, which TensorBoard reads past.
        logdir = storage.join(workdir, "tensorboard")
        if storage.is_url(logdir):
          self._tb_sync = (tempfile.mkdtemp(prefix="ztt_jax_tensorboard_"), logdir)
          logdir = self._tb_sync[0]
        self._tb = SummaryWriter(logdir, purge_step=start_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    clean = {k: _to_float(v) for k, v in flat(metrics).items()}
    line = json.dumps({"step": int(step), **clean})
    if self._rows is not None:
      self._rows.append(line)
      storage.write_text(self.path, "".join(r + "\n" for r in self._rows))
    else:
      with storage.path(self.path).open("a") as f:  # local only: gcsfs's "a" silently overwrites
        f.write(line + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if v is not None:
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
      self._sync_tensorboard()

  def _sync_tensorboard(self):
    if self._tb_sync is not None:
      local, url = self._tb_sync
      for name in os.listdir(local):  # this run's event file: new files each run, never another's
        storage.upload(os.path.join(local, name), storage.join(url, name))

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._sync_tensorboard()
      if self._tb_sync is not None:
        shutil.rmtree(self._tb_sync[0], ignore_errors=True)
      self._tb = None


def flat(metrics: Mapping[str, Any]) -> dict:
  """Scalars by name: the structured "eval/per_difficulty" ({difficulty: {"accuracy", "mean_cycles"}})
  becomes "eval/accuracy_difficulty_<d>" and "eval/mean_cycles_difficulty_<d>" in metrics.jsonl."""
  out = {}
  for name, v in metrics.items():
    if name == PER_DIFFICULTY:
      for d, by in v.items():
        out.update({f"eval/{k}_difficulty_{d}": x for k, x in by.items()})
    else:
      out[name] = v
  return out


def per_difficulty(scalars: Mapping[str, Any]) -> dict:
  """The inverse of `flat` for "eval/per_difficulty", for records read back from disk: {difficulty: {...}}."""
  by: dict = {}
  for name, v in scalars.items():
    m = _DIFFICULTY_NAME.fullmatch(name)
    if m:
      by.setdefault(int(m["difficulty"]), {})[m["metric"]] = v
  return dict(sorted(by.items()))


def eval_summary(eval_metrics: Mapping[str, Any]) -> str:
  """The final eval for the console; the per-difficulty results come from "eval/per_difficulty"."""
  if not eval_metrics:
    return "final eval: off (eval.max_batches=0)"
  lines = [f"final eval: loss {eval_metrics.get('eval/loss', float('nan')):.4f}, "
           f"mean cycles used {eval_metrics.get('eval/mean_cycles', float('nan')):.2f}"]
  if "eval/accuracy" in eval_metrics:
    lines.append(f"  accuracy (all difficulties): {eval_metrics['eval/accuracy']:.3f}")
    for d, by in eval_metrics[PER_DIFFICULTY].items():
      lines.append(f"  difficulty={d}: accuracy {by['accuracy']:.3f}, mean cycles {by['mean_cycles']:.2f}")
  return "\n".join(lines)


def _to_float(v):
  v = float(v)
  return v if math.isfinite(v) else None if math.isnan(v) else (1e308 if v > 0 else -1e308)


def truncate_after(path: str, step: int) -> None:
  """Drops the rows of `path` (a metrics.jsonl) past `step`, and a half-written last line, by
  writing the rest to a temporary file and renaming it over `path` (on an object store, one upload):
  a kill during the rewrite leaves the old file or the new one, never a mix."""
  if not storage.exists(path):
    return
  keep, dropped, broken = [], [], 0
  for line in _lines(path):
    try:
      row_step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
      broken += 1  # a line cut short when the previous run was killed
      continue
    if row_step <= step:
      keep.append(line)
    else:
      dropped.append(row_step)
  if not dropped and not broken:
    return
  storage.write_text(path, "".join(line + "\n" for line in keep))
  log.warning("Continuing from step %d: dropped %d metrics.jsonl rows past it (steps %s), which are "
              "trained again, and %d half-written lines.", step, len(dropped),
              f"{min(dropped)}..{max(dropped)}" if dropped else "none", broken)


def _lines(path: str) -> list[str]:
  return [line for line in storage.read_text(path).splitlines() if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in _lines(storage.join(workdir, "metrics.jsonl"))]
