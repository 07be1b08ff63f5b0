"""Metric sinks: WORKDIR/metrics.jsonl and TensorBoard, and the flat names of structured metrics."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

PER_DIFFICULTY = "eval/per_difficulty"
_DIFFICULTY_NAME = re.compile(r"eval/(?P<metric>accuracy|mean_cycles)_difficulty_(?P<difficulty>\d+)")


class MetricsWriter:
  """One JSON object per logged step (`{"step": s, "train/loss": ...}`), mirrored to TensorBoard.
  The trainer enables it on process 0 only."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    clean = {k: _to_float(v) for k, v in flat(metrics).items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if v is not None:
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


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


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
