"""Saved run results -> one summary JSON per task (mean and spread over seeds). No JAX computation."""
from __future__ import annotations

import json
import math

from ztt_jax import storage
from ztt_jax.metrics import per_difficulty

from ztt_jax.experiments.ladder import RUNGS, TASKS
from ztt_jax.experiments.published import MARKER

RUNG_ORDER = tuple(RUNGS)


def load_results(task_dir: str) -> list[dict]:
  rows = []
  runs = storage.listdir(task_dir) if storage.isdir(task_dir) else []
  for run in runs:
    path = storage.join(task_dir, run, "result.json")
    if storage.isfile(path):
      row = json.loads(storage.read_text(path))
      row["eval_curve"] = eval_curve(storage.join(task_dir, run, "metrics.jsonl"))
      rows.append(row)
  return rows


def eval_curve(metrics_path: str) -> dict:
  """{step: held-out loss} from the run's metrics.jsonl: shows whether the loss was still falling."""
  if not storage.isfile(metrics_path):
    return {}
  rows = [json.loads(line) for line in storage.read_text(metrics_path).splitlines() if line.strip()]
  return {str(r["step"]): r["eval/loss"] for r in rows if r.get("eval/loss") is not None}


def stats(values: list[float]) -> dict:
  """Mean and spread. With 2 seeds the spread is half the range (the distance of each seed from the
  mean); a population std would say the same thing less directly."""
  vals = [v for v in values if v is not None and math.isfinite(v)]
  if not vals:
    return {"mean": None, "spread": None, "n": 0, "values": []}
  mean = sum(vals) / len(vals)
  return {"mean": mean, "spread": (max(vals) - min(vals)) / 2, "n": len(vals), "values": vals}


def summarize_task(task: str, rows: list[dict]) -> dict:
  rungs = {}
  order = [r for r in RUNG_ORDER if any(x["rung"] == r for x in rows)]
  order += sorted({x["rung"] for x in rows} - set(order))
  for rung in order:
    rs = sorted((x for x in rows if x["rung"] == rung), key=lambda x: x["seed"])
    finals = [x["final"] for x in rs]
    entry = {
        "seeds": [x["seed"] for x in rs],
        "params": rs[0]["params"],
        "effective_depth": rs[0]["effective_depth"],
        "variant": rs[0]["variant"],
        "num_cycles": rs[0]["num_cycles"],
        "eval_loss": stats([f.get("eval/loss") for f in finals]),
        "bits_per_byte": stats([f["eval/loss"] / math.log(2) for f in finals if "eval/loss" in f]),
        "nanogpt_eval_loss": stats([x.get("nanogpt_eval_loss") for x in rs]),
        "load_avg_start": [x.get("load_avg_start") for x in rs],
        "tokens_per_sec": stats([x.get("median_tokens_per_sec") for x in rs]),
        "eval_loss_by_step": {st: stats([x["eval_curve"].get(st) for x in rs])
                              for st in sorted({k for x in rs for k in x.get("eval_curve", {})}, key=int)},
    }
    if any("eval/accuracy" in f for f in finals):
      entry["accuracy"] = stats([f.get("eval/accuracy") for f in finals])
      by_seed = [per_difficulty(f) for f in finals]
      levels = sorted({d for by in by_seed for d in by})
      entry["accuracy_by_difficulty"] = {str(d): stats([by.get(d, {}).get("accuracy") for by in by_seed])
                                         for d in levels}
    rungs[rung] = entry
  budget = {}
  mixed = {(x["steps"], x["tokens_per_step"]) for x in rows}
  if len(mixed) > 1:
    raise ValueError(f"{task}: runs with different budgets {sorted(mixed)} in one ladder; rerun them "
                     "into a fresh --out rather than mixing budgets")
  if rows:
    budget = {"steps": rows[0]["steps"], "tokens_per_step": rows[0]["tokens_per_step"],
              "tokens_per_run": rows[0]["steps"] * rows[0]["tokens_per_step"],
              "runs": len(rows), "train_wall_s_total": sum(x.get("wall_s", 0.0) for x in rows)}
  return {"task": task, "budget": budget, "rungs": rungs}


def summaries(out_dir: str, tasks=TASKS) -> dict:
  """{task: summary} of every task with finished runs under `out_dir`, each marked as the report's
  (ztt_jax/experiments/published.py) for the JSON the report writes from it."""
  out = {}
  for task in tasks:
    rows = load_results(storage.join(storage.absolute(out_dir), task))
    if rows:
      out[task] = {"written_by": MARKER, **summarize_task(task, rows)}
  return out
