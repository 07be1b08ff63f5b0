"""PNG plots of the ladder and exit summaries (saved JSON in, PNG out; no JAX)."""
from __future__ import annotations


def _plt():
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt
  return plt


def plot_ladder(summary: dict, path: str) -> str:
  """Held-out quality per rung, one dot per seed and a bar at the mean; multi-hop adds per-hop bars."""
  plt = _plt()
  rungs = list(summary["rungs"])
  multihop = summary["task"] == "multihop"
  key, label = ("accuracy", "held-out accuracy (higher is better)") if multihop else \
      ("bits_per_byte", "held-out bits per byte (lower is better)")
  fig, axes = plt.subplots(1, 2 if multihop else 1, figsize=(11 if multihop else 6, 4.2), dpi=120,
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
  if vals and not multihop:
    lo, hi = min(vals), max(vals)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
  b = summary["budget"]
  ax.set_title(f"{summary['task']}: {b['steps']} steps x {b['tokens_per_step']} tokens, mean ± half-range")
  ax.grid(alpha=0.3, axis="y")
  if multihop:
    ax = axes[0][1]
    hops = sorted({h for r in rungs for h in summary["rungs"][r].get("accuracy_by_difficulty", {})}, key=int)
    w = 0.8 / max(len(rungs), 1)
    for i, r in enumerate(rungs):
      by = summary["rungs"][r]["accuracy_by_difficulty"]
      xs = [int(h) + (i - (len(rungs) - 1) / 2) * w for h in hops]
      ax.bar(xs, [by[h]["mean"] for h in hops], width=w, label=r, yerr=[by[h]["spread"] for h in hops],
             capsize=2)
    ax.set_xticks([int(h) for h in hops])
    ax.set_xlabel("hops needed for the answer")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy by hop count")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_cycles_by_hop(sweeps: list[dict], path: str) -> str:
  """Mean cycles used against hop count, one line per zero-attention threshold (seed 0 solid, others dashed)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
  hops = set()
  for si, sw in enumerate(sweeps):
    pts = [p for p in sw["points"] if p["rule"] == "zero_attention" and p.get("per_difficulty")]
    for j, p in enumerate(sorted(pts, key=lambda p: p["parameter"])):
      hops |= {int(h) for h in p["per_difficulty"]}
      hs = sorted(p["per_difficulty"], key=int)
      ax.plot([int(h) for h in hs], [p["per_difficulty"][h]["mean_cycles"] for h in hs], marker="o",
              ls="-" if si == 0 else "--", color=f"C{j % 10}",
              label=f"tau={p['parameter']:.3g} (mean {p['mean_cycles']:.2f})" if si == 0 else None)
  ax.set_xticks(sorted(hops))
  ax.set_xlabel("hops needed for the answer")
  ax.set_ylabel("mean cycles used on the answer token")
  ax.set_title("zero-attention exit: cycles used vs hop count" + (" (solid: seed 0, dashed: seed 1)" if len(sweeps) > 1 else ""),
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="seed 0 thresholds", title_fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_depth(depth: dict, path: str) -> str:
  """Accuracy by hop count, one line per test-time cycle count; the untrained hop counts shaded."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
  for p in depth["points"]:
    hs = sorted(p["per_difficulty"], key=int)
    ax.plot([int(h) for h in hs], [p["per_difficulty"][h]["accuracy"] for h in hs], marker="o",
            label=f"{p['num_cycles']} cycles" + (" (trained)" if p["num_cycles"] == depth["trained_cycles"] else ""))
  ax.axvspan(depth["trained_max_hops"] + 0.5, depth["max_hops"] + 0.5, color="0.9", label="hops not trained")
  ax.set_xlabel("hops needed for the answer")
  ax.set_ylabel("held-out accuracy (exit off)")
  ax.set_title(f"test-time depth: {depth['rung']} seed {depth['seed']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
