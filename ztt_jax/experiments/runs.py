"""Training the ladder's runs, resumably: one work directory per (rung, seed) under OUT/TASK."""
from __future__ import annotations

import json
import os
import time

import jax

from ztt_jax import run as run_lib
from ztt_jax.experiments.ladder import RUNGS, rung_config, run_name
from ztt_jax.metrics import flat, read_metrics
from ztt_jax.trainer import train

RESULT = "result.json"


def finished(workdir: str) -> bool:
  """result.json is written only after the trainer returns, so its presence means the run is done."""
  return os.path.isfile(os.path.join(workdir, RESULT))


def param_count(cfg) -> int:
  return int(sum(x.size for x in jax.tree.leaves(run_lib.build(cfg).abstract_state.params)))


def train_one(task: str, rung: str, seed: int, out: str, *, data_path=None, steps=None) -> dict:
  cfg = rung_config(task, rung, seed, data_path=data_path, steps=steps)
  workdir = os.path.join(out, run_name(rung, seed))
  t0 = time.perf_counter()
  final = train(cfg, workdir)
  if "preempted_at" in final:
    return final
  rows = read_metrics(workdir)
  tok_s = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r]
  result = {
      "task": task, "rung": rung, "seed": seed, "steps": cfg.train.steps,
      "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
      "params": param_count(cfg), "effective_depth": cfg.model.effective_depth,
      "variant": cfg.model.canonical_variant, "num_cycles": cfg.model.cycles,
      # wall time of this invocation only; a resumed run reports the last leg
      "wall_s": time.perf_counter() - t0,
      "median_tokens_per_sec": sorted(tok_s)[len(tok_s) // 2] if tok_s else None,
      "final": {k: float(v) for k, v in flat(final).items()},
  }
  with open(os.path.join(workdir, RESULT), "w") as f:
    json.dump(result, f, indent=1)
  return result


def run_ladder(task: str, out: str, seeds: int, *, data_path=None, steps=None, rungs=None, log=print):
  """Seed-major order, so a ladder stopped halfway has every rung at seed 0 before any at seed 1."""
  out = os.path.join(out, task)
  os.makedirs(out, exist_ok=True)
  for seed in range(seeds):
    for rung in rungs or RUNGS:
      workdir = os.path.join(out, run_name(rung, seed))
      if finished(workdir):
        log(f"[{task}] {run_name(rung, seed)}: done, skipped")
        continue
      log(f"[{task}] {run_name(rung, seed)}: training ({time.strftime('%H:%M:%S')})")
      r = train_one(task, rung, seed, out, data_path=data_path, steps=steps)
      log(f"[{task}] {run_name(rung, seed)}: {json.dumps(r.get('final', r))} in {r.get('wall_s', 0):.0f}s")
