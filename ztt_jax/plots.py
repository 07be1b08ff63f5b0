"""Plots from saved JSON (no JAX): quality against compute for the exit rules of a sweep."""
from __future__ import annotations

import io
import json

from ztt_jax import storage

RULE_STYLE = {
    "zero_attention": dict(marker="o", label="zero attention (ZTT)"),
    "confidence": dict(marker="s", label="confidence (CALM)"),
    "fixed": dict(marker="^", label="fixed cut after c cycles"),
    "gate": dict(marker="D", label="learned exit gate (Ouro)"),
}


def load_sweep(path: str) -> dict:
  return json.loads(storage.read_text(path))


def save_figure(fig, path: str, **kw) -> str:
  """fig as a PNG at `path` (a local path or a URL), written at once; closes fig."""
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kw)
  plt.close(fig)
  storage.makedirs(storage.parent(storage.absolute(path)))
  storage.write_bytes(path, buf.getvalue())
  return path


def plot_quality_vs_compute(sweep: dict, path: str, metric: str | None = None, title: str | None = None,
                            x: str = "compute_fraction") -> str:
  """One line per rule of `sweep['points']`: `metric` (default sweep['metric']) against `x`
  (compute_fraction or mean_cycles). Writes a PNG to `path` and returns it."""
  import matplotlib
  matplotlib.use("Agg")  # headless: never open a window
  import matplotlib.pyplot as plt

  metric = metric or sweep["metric"]
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
  rules = [r for r in RULE_STYLE if any(p["rule"] == r for p in sweep["points"])]
  rules += sorted({p["rule"] for p in sweep["points"]} - set(rules))
  for rule in rules:
    pts = sorted((p for p in sweep["points"] if p["rule"] == rule and p.get(metric) is not None),
                 key=lambda p: p[x])
    style = RULE_STYLE.get(rule, dict(marker=".", label=rule))
    ax.plot([p[x] for p in pts], [p[metric] for p in pts], marker=style["marker"],
            label=style["label"])
  ax.set_xlabel("compute fraction (FLOPs used / FLOPs with every cycle)" if x == "compute_fraction"
                else x.replace("_", " "))
  ax.set_ylabel(metric.replace("_", " ") + (" (higher is better)" if metric == "accuracy" else " (lower is better)"))
  ax.set_title(title or f"{metric} vs compute, step {sweep.get('step', '?')}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, path)
