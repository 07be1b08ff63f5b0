"""Metric sinks: WORKDIR/metrics.jsonl and TensorBoard, and the flat names of structured metrics."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

PER_HOP = "eval/per_hop"
_HOP_NAME = re.compile(r"eval/(?P<metric>accuracy|mean_cycles)_hops_(?P<hops>\d+)")


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
  """Scalars by name: the structured "eval/per_hop" ({hops: {"accuracy", "mean_cycles"}}) becomes
  "eval/accuracy_hops_<h>" and "eval/mean_cycles_hops_<h>", the names metrics.jsonl has always had."""
  out = {}
  for name, v in metrics.items():
    if name == PER_HOP:
      for h, hop in v.items():
        out.update({f"eval/{k}_hops_{h}": x for k, x in hop.items()})
    else:
      out[name] = v
  return out


def per_hop(scalars: Mapping[str, Any]) -> dict:
  """The inverse of `flat` for "eval/per_hop", for records read back from disk: {hops: {...}}."""
  hops: dict = {}
  for name, v in scalars.items():
    m = _HOP_NAME.fullmatch(name)
    if m:
      hops.setdefault(int(m["hops"]), {})[m["metric"]] = v
  return dict(sorted(hops.items()))


def eval_summary(eval_metrics: Mapping[str, Any]) -> str:
  """The final eval for the console; the per-hop results come from the structured "eval/per_hop"."""
  if not eval_metrics:
    return "final eval: off (eval.max_batches=0)"
  lines = [f"final eval: loss {eval_metrics.get('eval/loss', float('nan')):.4f}, "
           f"mean cycles used {eval_metrics.get('eval/mean_cycles', float('nan')):.2f}"]
  if "eval/accuracy" in eval_metrics:
    lines.append(f"  accuracy (all hops): {eval_metrics['eval/accuracy']:.3f}")
    for h, hop in eval_metrics[PER_HOP].items():
      lines.append(f"  hops={h}: accuracy {hop['accuracy']:.3f}, mean cycles {hop['mean_cycles']:.2f}")
  return "\n".join(lines)


def _to_float(v):
  v = float(v)
  return v if math.isfinite(v) else None if math.isnan(v) else (1e308 if v > 0 else -1e308)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
