"""Exit trade-off and test-time depth of a ladder rung's trained model, saved per seed."""
from __future__ import annotations

import math
import os

from ztt_jax import evaluator, restore
from ztt_jax.experiments.ladder import result_stem, run_name
from ztt_jax.experiments.runs import finished
from ztt_jax.model.exit import ExitRule

# Held-out batches per sweep point: all of multi-hop's 512 examples; 16 x 32 windows of text
# (every point of a sweep sees the same batches, so the rules stay comparable).
MAX_BATCHES = {"text": 16, "multihop": None}
# Test-time depth: cycles as multiples of the trained count, on held-out queries up to 2 more hops.
DEPTH_FACTORS = (1.0, 1.5, 2.0)
EXTRA_HOPS = 2


def sweep_path(results_dir: str, task: str, seed: int, rung: str = "ztt") -> str:
  return os.path.join(results_dir, f"sweep_{result_stem(task, rung)}_s{seed}.json")


def depth_path(results_dir: str, task: str, seed: int, rung: str = "ztt") -> str:
  return os.path.join(results_dir, f"depth_{result_stem(task, rung)}_s{seed}.json")


def _trained_runs(task, out, seeds, rung, paths, log):
  for seed in range(seeds):
    workdir = os.path.join(out, task, run_name(rung, seed))
    if all(os.path.isfile(p(seed)) for p in paths):
      log(f"[{task}] {rung} seed {seed}: done, skipped")
      continue
    if not finished(workdir):
      log(f"[{task}] {rung} seed {seed}: {workdir} has not finished training; skipped")
      continue
    yield seed, workdir, restore.load_trained(workdir)


def sweep_ztt(task: str, out: str, results_dir: str, seeds: int, *, rung: str = "ztt",
              num_thresholds: int = 8, log=print):
  """Every exit rule the rung's model has (with exit_gate: four) on the same held-out batches; and
  on multi-hop, accuracy by hop at DEPTH_FACTORS x the trained cycles (depth extrapolation)."""
  os.makedirs(results_dir, exist_ok=True)
  paths = [lambda s: sweep_path(results_dir, task, s, rung)]
  if task == "multihop":
    paths.append(lambda s: depth_path(results_dir, task, s, rung))
  for seed, workdir, trained in _trained_runs(task, out, seeds, rung, paths, log):
    result = evaluator.sweep(trained, num_thresholds=num_thresholds, max_batches=MAX_BATCHES[task])
    result.update(task=task, seed=seed, rung=rung, workdir=workdir)
    evaluator.write_json(result, sweep_path(results_dir, task, seed, rung))
    log(f"[{task}] sweep seed {seed}: {len(result['points'])} points")
    if task == "multihop":
      c = trained.cfg.model.cycles
      hops = trained.cfg.data.max_hops + EXTRA_HOPS
      depth = {"task": task, "seed": seed, "rung": rung, "workdir": workdir, "trained_cycles": c,
               "trained_max_hops": trained.cfg.data.max_hops, "max_hops": hops, "points": []}
      for f in DEPTH_FACTORS:
        r = evaluator.evaluate(trained, ExitRule.from_config(trained.cfg.model).replace(threshold=None),
                               num_cycles=int(math.ceil(f * c)), max_hops=hops)
        depth["points"].append({"num_cycles": r["num_cycles"], "accuracy": r["accuracy"], "per_difficulty": r["per_difficulty"]})
        log(f"[{task}] depth seed {seed}: {r['num_cycles']} cycles, accuracy {r['accuracy']:.3f}")
      evaluator.write_json(depth, depth_path(results_dir, task, seed, rung))
