"""Metric sinks: WORKDIR/metrics.jsonl and TensorBoard, written by process 0 only."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax


class MetricsWriter:
  """One JSON object per logged step (`{"step": s, "train/loss": ...}`), mirrored to TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    clean = {k: _to_float(v) for k, v in scalars.items()}
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


def _to_float(v):
  v = float(v)
  return v if math.isfinite(v) else None if math.isnan(v) else (1e308 if v > 0 else -1e308)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
