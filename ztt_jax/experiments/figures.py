"""PNG plots of the ladder and exit summaries (saved JSON in, PNG out; no JAX)."""
from __future__ import annotations

from ztt_jax.data.config import SYNTHETIC_KINDS
from ztt_jax.plots import save_figure

# What a difficulty d counts, per embedded task (the x axis of the by-difficulty plots).
DIFFICULTY_LABEL = {"multihop": "difficulty: hops needed for the answer",
                    "propagation": "difficulty: windows between a position and its marker"}


def _plt():
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt
  return plt


def plot_ladder(summary: dict, path: str) -> str:
  """Held-out quality per rung, one dot per seed and a bar at the mean; an embedded task adds bars
  by difficulty."""
  plt = _plt()
  rungs = list(summary["rungs"])
  embedded = summary["task"] in SYNTHETIC_KINDS
  key, label = ("accuracy", "held-out accuracy (higher is better)") if embedded else \
      ("bits_per_byte", "held-out bits per byte (lower is better)")
  fig, axes = plt.subplots(1, 2 if embedded else 1, figsize=(11 if embedded else 6, 4.2), dpi=120,
                           squeeze=False)
  ax = axes[0][0]
  for i, r in enumerate(rungs):
    s = summary["rungs"][r][key]
    ax.bar(i, s["mean"], color="C0" if r != "ztt" else "C3", alpha=0.6)
    ax.errorbar(i, s["mean"], yerr=s["spread"], color="k", capsize=4)
    ax.plot([i] * len(s["values"]), s["values"], "k.", ms=6)
  ax.set_xticks(range(len(rungs)), [f"{r}\n{summary['rungs'][r]['params'] / 1e3:.0f}k params" for r in rungs])
  ax.set_ylabel(label)
  vals = [v for r in rungs for v in summary["rungs"][r][key]["values"]]
  if vals and not embedded:
    lo, hi = min(vals), max(vals)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
  b = summary["budget"]
  ax.set_title(f"{summary['task']}: {b['steps']} steps x {b['tokens_per_step']} tokens, mean ± half-range")
  ax.grid(alpha=0.3, axis="y")
  if embedded:
    ax = axes[0][1]
    levels = sorted({d for r in rungs for d in summary["rungs"][r].get("accuracy_by_difficulty", {})}, key=int)
    w = 0.8 / max(len(rungs), 1)
    for i, r in enumerate(rungs):
      by = summary["rungs"][r].get("accuracy_by_difficulty", {})
      got = [d for d in levels if d in by and by[d]["mean"] is not None]
      xs = [int(d) + (i - (len(rungs) - 1) / 2) * w for d in got]
      ax.bar(xs, [by[d]["mean"] for d in got], width=w, label=r, yerr=[by[d]["spread"] for d in got], capsize=2)
    ax.set_xticks([int(d) for d in levels])
    ax.set_xlabel(DIFFICULTY_LABEL[summary["task"]])
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy by difficulty")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return save_figure(fig, path)


def plot_cycles_by_difficulty(sweeps: list[dict], path: str, task: str) -> str:
  """Mean cycles used against difficulty, one line per zero-attention threshold (seed 0 solid,
  others dashed)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
  levels = set()
  for si, sw in enumerate(sweeps):
    pts = [p for p in sw["points"] if p["rule"] == "zero_attention" and p.get("per_difficulty")]
    for j, p in enumerate(sorted(pts, key=lambda p: p["parameter"])):
      levels |= {int(d) for d in p["per_difficulty"]}
      ds = sorted(p["per_difficulty"], key=int)
      ax.plot([int(d) for d in ds], [p["per_difficulty"][d]["mean_cycles"] for d in ds], marker="o",
              ls="-" if si == 0 else "--", color=f"C{j % 10}",
              label=f"tau={p['parameter']:.3g} (mean {p['mean_cycles']:.2f})" if si == 0 else None)
  ax.set_xticks(sorted(levels))
  ax.set_xlabel(DIFFICULTY_LABEL[task])
  ax.set_ylabel("mean cycles used on the scored tokens")
  ax.set_title(f"{task}, zero-attention exit: cycles used vs difficulty"
               + (" (solid: seed 0, dashed: other seeds)" if len(sweeps) > 1 else ""), fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="seed 0 thresholds", title_fontsize=7)
  fig.tight_layout()
  return save_figure(fig, path)


def plot_depth(depth: dict, path: str, task: str) -> str:
  """Accuracy by difficulty, one line per test-time cycle count; a vertical line at the trained
  maximum D and the untrained difficulties past it shaded."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
  for p in depth["points"]:
    ds = sorted(p["per_difficulty"], key=int)
    ax.plot([int(d) for d in ds], [p["per_difficulty"][d]["accuracy"] for d in ds], marker="o",
            label=f"{p['num_cycles']} cycles" + (" (trained)" if p["num_cycles"] == depth["trained_cycles"] else ""))
  trained_d = depth["trained_max_difficulty"]
  ax.axvline(trained_d, color="k", ls=":", lw=1, label=f"trained up to d={trained_d}")
  ax.axvspan(trained_d + 0.5, depth["max_difficulty"] + 0.5, color="0.9", label="difficulties not trained")
  ax.set_xlabel(DIFFICULTY_LABEL[task])
  ax.set_ylabel("held-out accuracy (exit off)")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{task}, test-time depth: {depth['rung']} seed {depth['seed']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return save_figure(fig, path)
