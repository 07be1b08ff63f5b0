"""The fine-tuning claim's report: saved JSON under OUT -> a summary JSON, a markdown block and plots.

Reads what experiments/finetune_claim.py wrote (trains and evaluates nothing). Into OUT by default:
  OUT/finetune_claim.json, OUT/finetune_claim.md (the blocks), OUT/finetune_claim.png,
  OUT/exit_finetune_claim.png
With --docs=DIR: DIR/results/finetune_claim.json, DIR/finetune_claim.png, DIR/exit_finetune_claim.png
and the bodies of DIR/results.md's `<!-- auto:finetune_claim -->` and `<!-- auto:exit_finetune_claim -->`
blocks. Either way a file is replaced only if this report wrote it (published.py's markers), and a
published summary of a bigger run (more runs, seeds or teacher steps) only with --overwrite.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

from ztt_jax.errors import OutputError
from ztt_jax.experiments import published
from ztt_jax.experiments.claim_plan import ARMS, CONTROLS, GOAL_NATS, TEACHER, best_arm, read_json, results
from ztt_jax.experiments.report import fill, sweep_table
from ztt_jax.experiments.summary import stats
from ztt_jax.plots import plot_quality_vs_compute

NAME = "finetune_claim"
# "About half the teacher's layer parameters": the shared layers alone are 50% of them; rank-8 deltas
# add 7 points at the ladder's width, rank 32 28 (experiments/finetune_claim.py ARMS).
HALF = 0.6
MD_HEAD = f"<!-- written by ztt_jax.experiments.{NAME} --report; regenerated in place -->"


def _maybe(path: str):
  return read_json(path) if os.path.isfile(path) else None


def _one(values) -> Optional[int]:
  values = sorted(set(values))
  return values[0] if len(values) == 1 else (values or None)


def summarize(out: str) -> dict:
  """Everything the report shows, from OUT's result files (any missing stage is left out)."""
  teacher = _maybe(os.path.join(out, "teacher", "result.json"))
  finetuned, controls = results(os.path.join(out, "finetune")), results(os.path.join(out, "controls"))
  runs = ([teacher] if teacher else []) + finetuned + controls
  t_layers = teacher["param_counts"]["layers"] if teacher else None
  arms = {}
  for arm in ARMS:
    conv = _maybe(os.path.join(out, "convert", f"{arm}.json"))
    rs = sorted((r for r in finetuned if r["arm"] == arm), key=lambda r: r["seed"])
    if not (conv or rs):
      continue
    counts = conv["param_counts"] if conv else rs[0]["param_counts"]
    arms[arm] = {**ARMS[arm], "before": conv["nanogpt_eval_loss"] if conv else None,
                 "after": stats([r["nanogpt_eval_loss"] for r in rs]), "seeds": [r["seed"] for r in rs],
                 "data_seeds": [r["data_seed"] for r in rs], "param_counts": counts,
                 "layer_fraction": counts["layers"] / t_layers if t_layers else None,
                 "steps": _one(r["steps"] for r in rs),
                 "learning_rate": _one(r["learning_rate"] for r in rs),
                 "cycle_loss_weight": _one(r["cycle_loss_weight"] for r in rs)}
  ctl = {}
  for rung in CONTROLS:
    rs = sorted((r for r in controls if r["rung"] == rung), key=lambda r: r["seed"])
    if rs:
      ctl[rung] = {"loss": stats([r["nanogpt_eval_loss"] for r in rs]), "seeds": [r["seed"] for r in rs],
                   "param_counts": rs[0]["param_counts"], "steps": _one(r["steps"] for r in rs),
                   "layer_fraction": rs[0]["param_counts"]["layers"] / t_layers if t_layers else None}
  best = best_arm(finetuned)
  pattern = os.path.join(out, "exits", f"sweep_{best}_s*.json")
  sweeps = [read_json(p) for p in sorted(glob.glob(pattern))] if best else []
  s = {"written_by": published.MARKER, "report": NAME,
       "budget": {"teacher_steps": teacher["steps"] if teacher else None,
                  "finetune_steps": _one(r["steps"] for r in finetuned),
                  "control_steps": _one(r["steps"] for r in controls),
                  "tokens_per_step": _one(r["tokens_per_step"] for r in runs),
                  "seeds": max([len(v["seeds"]) for v in [*arms.values(), *ctl.values()]] + [0]),
                  "runs": len(runs), "train_wall_s_total": sum(r["wall_s"] for r in runs)},
       "teacher": teacher and {"rung": TEACHER, "loss": teacher["nanogpt_eval_loss"],
                               "param_counts": teacher["param_counts"], "steps": teacher["steps"]},
       "roundtrip": _maybe(os.path.join(out, "roundtrip.json")),
       "arms": arms, "controls": ctl, "goal": goal(teacher, arms, ctl, best),
       "exits": {"arm": best, "sweeps": sweeps} if sweeps else None,
       "hardware": sorted({r["hardware"]["platform"] + " | " + r["hardware"]["cpu"] +
                           f" | {r['hardware']['usable_cores']} usable of {r['hardware']['cores']} cores"
                           f" | jax {r['hardware']['jax']} on {r['hardware']['jax_backend']}" for r in runs}),
       "runs": [{"name": _run_name(r), "steps": r["steps"], "wall_s": r["wall_s"],
                 "ms_per_step": 1e3 * r["wall_s"] / r["steps"], "load_avg_start": r["load_avg_start"],
                 "load_avg_end": r["load_avg_end"]} for r in runs]}
  return s


def _run_name(r: dict) -> str:
  return f"{r['stage']}/{r.get('arm', r.get('rung'))}_s{r['seed']}"


def goal(teacher, arms: dict, ctl: dict, best) -> Optional[dict]:
  """The claim's two goals for the best fine-tuned arm that keeps about half the teacher's layer
  parameters (at most HALF of them): within GOAL_NATS of the teacher, and below every control's mean.
  The best arm of all (the exit bake-off's) is named beside it when it is another one."""
  if not (teacher and best):
    return None
  t_loss = teacher["nanogpt_eval_loss"]
  half = [a for a, v in arms.items() if v["after"]["mean"] is not None and v["layer_fraction"] is not None
          and v["layer_fraction"] <= HALF]
  claim = min(half, key=lambda a: arms[a]["after"]["mean"]) if half else None
  best_ctl = min(ctl, key=lambda k: ctl[k]["loss"]["mean"]) if ctl else None
  g = {"best_arm": best, "best_loss": arms[best]["after"]["mean"], "teacher_loss": t_loss, "goal_nats": GOAL_NATS,
       "half": HALF, "claim_arm": claim, "best_control": best_ctl,
       "best_control_loss": ctl[best_ctl]["loss"]["mean"] if best_ctl else None}
  if claim:
    loss = arms[claim]["after"]["mean"]
    g.update(loss=loss, gap_to_teacher=loss - t_loss, within_goal=loss - t_loss <= GOAL_NATS,
             layer_fraction=arms[claim]["layer_fraction"],
             beats_every_control=(all(loss < c["loss"]["mean"] for c in ctl.values()) and set(ctl) == set(CONTROLS))
             if ctl else None)
  return g


# ------------------------------------------------------------------ markdown

def _f(s: dict, digits=3) -> str:
  if not s or s.get("mean") is None:
    return "n/a"
  return f"{s['mean']:.{digits}f} ± {s['spread']:.{digits}f} ({s['n']})"


def _pct(x) -> str:
  return f" ({100 * x:.0f}%)" if x is not None else ""


def claim_table(s: dict) -> str:
  b, t = s["budget"], s["teacher"]
  t_loss = t["loss"] if t else None
  delta = lambda x: f"{x - t_loss:+.3f}" if (x is not None and t_loss is not None) else "n/a"  # noqa: E731
  head = ["model", "layer params (of the teacher's)", "training", "held-out loss before fine-tuning",
          "held-out loss (seeds)", "vs teacher"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  if t:
    lines.append(f"| teacher `{TEACHER}` (Llama form) | {t['param_counts']['layers']:,} (100%) | {t['steps']} steps "
                 f"| - | {t_loss:.3f} (1) | 0 |")
  for arm, a in s["arms"].items():
    before = "n/a" if a["before"] is None else f"{a['before']:.3f}"
    lines.append(f"| ZTT 1 + 2x3 + 1 `{arm}` | {a['param_counts']['layers']:,}{_pct(a['layer_fraction'])} | "
                 f"+{a['steps'] or 0} steps fine-tuning | {before} | {_f(a['after'])} | {delta(a['after']['mean'])} |")
  for rung, c in s["controls"].items():
    lines.append(f"| control `{rung}` from scratch | {c['param_counts']['layers']:,}{_pct(c['layer_fraction'])} | "
                 f"{c['steps']} steps | - | {_f(c['loss'])} | {delta(c['loss']['mean'])} |")
  lines.append("")
  g = s["goal"]
  if g and g["claim_arm"]:
    lines.append(f"- **Within {g['goal_nats']} nats of the teacher with about half its layer parameters** (the best "
                 f"arm at most {100 * g['half']:.0f}% of them): `{g['claim_arm']}` {g['loss']:.3f} vs "
                 f"{g['teacher_loss']:.3f}, {g['gap_to_teacher']:+.3f} nats, {100 * g['layer_fraction']:.0f}% of the "
                 f"teacher's layer parameters: **{'met' if g['within_goal'] else 'not met'}**.")
    if g["best_control"]:
      verdict = {True: "met", False: "not met", None: "n/a"}[g["beats_every_control"]]
      lines.append(f"- **It beats every from-scratch control at equal total tokens:** best control "
                   f"`{g['best_control']}` {g['best_control_loss']:.3f}: **{verdict}**"
                   + ("" if set(s["controls"]) == set(CONTROLS) else " (not every control has run)") + ".")
  if g and g["best_arm"] != g["claim_arm"]:
    lines.append(f"- The best arm of all is `{g['best_arm']}` ({g['best_loss']:.3f}, "
                 f"{g['best_loss'] - g['teacher_loss']:+.3f} nats, "
                 f"{100 * s['arms'][g['best_arm']]['layer_fraction']:.0f}% of the teacher's layer parameters).")
  rt = s["roundtrip"]
  if rt:
    lines.append(f"- Round trip through `transformers.LlamaForCausalLM` ({rt['transformers']}): max |logit "
                 f"difference| {rt['max_abs_logit_diff']:.1e} over {rt['windows']} held-out windows (tolerance "
                 f"{rt['tolerance']:g}; logits up to {rt['max_abs_logit']:.1f}).")
  a0 = next(iter(s["arms"].values()), None)
  lines.append(f"- Held-out loss: nanoGPT's protocol (nats per byte, 20 x 12 windows of the last 10%). Mean ± half "
               f"the range over seeds (count in brackets). Fine-tuning: lr "
               f"{a0['learning_rate'] if a0 else '?'} (warmup + cosine), deep supervision weight "
               f"{a0['cycle_loss_weight'] if a0 else '?'}; a fine-tune's seed is its data order.")
  lines.append(f"- Budget: {b['tokens_per_step']} tokens per step; {b['runs']} runs, "
               f"{b['train_wall_s_total'] / 60:.1f} min of training wall time. Hardware: "
               + "; ".join(s["hardware"]) + ".")
  lines += ["", "| run | steps | wall s | ms/step | load avg (1/5/15 min) at start | at end |",
            "|---|---|---|---|---|---|"]
  for r in s["runs"]:
    la = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    lines.append(f"| {r['name']} | {r['steps']} | {r['wall_s']:.0f} | {r['ms_per_step']:.0f} | "
                 f"{la(r['load_avg_start'])} | {la(r['load_avg_end'])} |")
  return "\n".join(lines)


def exit_block(s: dict) -> Optional[str]:
  e = s["exits"]
  if not e:
    return None
  sw = e["sweeps"][0]
  return (f"Exit rules on the fine-tuned `{e['arm']}` (seed {sw['seed']}; {len(e['sweeps'])} seed(s) swept, "
          f"`exits/sweep_{e['arm']}_s*.json`):\n\n" + sweep_table(sw))


# ------------------------------------------------------------------ plot

def plot_claim(s: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
  names, x = [], 0
  for arm, a in s["arms"].items():
    if a["before"] is not None:
      ax.plot([x], [a["before"]], "o", mfc="none", color="tab:gray",
              label="converted, before fine-tuning" if x == 0 else None)
    if a["after"]["mean"] is not None:
      ax.errorbar([x], [a["after"]["mean"]], yerr=[a["after"]["spread"]], fmt="o", color="tab:blue", capsize=3,
                  label="converted, fine-tuned" if x == 0 else None)
    names.append(arm)
    x += 1
  for i, (rung, c) in enumerate(s["controls"].items()):
    ax.errorbar([x], [c["loss"]["mean"]], yerr=[c["loss"]["spread"]], fmt="s", color="tab:orange", capsize=3,
                label="from scratch (control)" if i == 0 else None)
    names.append(rung)
    x += 1
  if s["teacher"]:
    t = s["teacher"]["loss"]
    ax.axhline(t, color="k", lw=1, label=f"teacher {TEACHER}")
    ax.axhline(t + GOAL_NATS, color="k", ls="--", lw=1, label=f"teacher + {GOAL_NATS} (goal)")
  ax.set_xticks(range(len(names)), names, rotation=20)
  ax.set_ylabel("held-out loss, nats/byte (lower is better)")
  ax.set_title("Llama-form teacher converted to a ZTT 1 + 2x3 + 1")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


# ------------------------------------------------------------------ writing, never over others' files

def _png(plot):
  """A writer of plot(path)'s PNG carrying the report's marker."""
  def write(path):
    plot(path)
    published.stamp_png(path)
  return write


def _text(text: str):
  def write(path):
    with open(path, "w") as f:
      f.write(text)
  return write


def _json(obj):
  import json
  return _text(json.dumps(obj, indent=1))


def _size(s: dict) -> dict:
  b = s["budget"]
  return {"runs": b["runs"], "seeds": b["seeds"], "steps": b["teacher_steps"] or 0}


def _check(files: dict, dest: str, s: dict, overwrite: bool, default_dir: str) -> None:
  for path in files:
    if path.endswith(".md"):  # OUT/finetune_claim.md: ours if it starts with our line
      if os.path.exists(path):
        with open(path, errors="replace") as f:
          if f.readline().rstrip("\n") != MD_HEAD:
            raise OutputError(f"{path} exists and was not written by the report (no first line {MD_HEAD!r}); "
                              "move it away")
    else:
      published.check_ours([path], dest)
    if path.endswith(f"{NAME}.json") and os.path.isfile(path):
      old = published.load_json(path)
      if old and old.get("report") == NAME:
        published.check_not_smaller(path, _size(old), _size(s), overwrite=overwrite, default_dir=default_dir)


def write_report(out: str, docs: Optional[str] = None, *, overwrite: bool = False, log=print) -> dict:
  """Writes the report (see the module docstring) and returns the summary."""
  s = summarize(out)
  blocks = {NAME: claim_table(s)}
  if exit_block(s):
    blocks[f"exit_{NAME}"] = exit_block(s)
  dest = docs or out
  files = {os.path.join(dest, "results", f"{NAME}.json") if docs else os.path.join(out, f"{NAME}.json"): _json(s),
           os.path.join(dest, f"{NAME}.png"): _png(lambda p: plot_claim(s, p))}
  if s["exits"]:
    sw, arm = s["exits"]["sweeps"][0], s["exits"]["arm"]
    files[os.path.join(dest, f"exit_{NAME}.png")] = _png(lambda p: plot_quality_vs_compute(
        sw, p, x="mean_cycles", title=f"exit rules on the fine-tuned {arm} (seed {sw['seed']})"))
  if not docs:
    files[os.path.join(out, f"{NAME}.md")] = _text(
        MD_HEAD + "\n" + "".join(f"\n<!-- auto:{k} -->\n{v}\n<!-- /auto:{k} -->\n" for k, v in blocks.items()))
  _check(files, dest, s, overwrite, default_dir=out)
  for path, write in files.items():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    published.write_atomic(path, write)
    log(f"wrote {path}")
  if docs:
    md = os.path.join(docs, "results.md")
    text = open(md).read() if os.path.isfile(md) else "# Results\n" + "".join(
        f"\n<!-- auto:{k} -->\n<!-- /auto:{k} -->\n" for k in blocks)
    missing = [k for k in blocks if f"<!-- auto:{k} -->" not in text]
    if missing:
      log(f"{md} has no block for: {', '.join(missing)} (add <!-- auto:NAME --><!-- /auto:NAME --> where it belongs)")
    new = fill(text, blocks)
    if new != text or not os.path.isfile(md):
      published.write_atomic(md, _text(new))
      log(f"updated {md}")
  log(blocks[NAME])
  return s
