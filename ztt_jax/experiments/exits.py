"""Exit trade-off and test-time depth of a ladder rung's trained model, saved per seed."""
from __future__ import annotations

import math

from ztt_jax import evaluator, restore, storage
from ztt_jax.data.config import SYNTHETIC_KINDS
from ztt_jax.experiments.ladder import result_stem, run_name
from ztt_jax.experiments.runs import finished
from ztt_jax.model.exit import ExitRule

# Held-out batches per sweep point: all 512 examples of an embedded task; 16 x 32 windows of text
# (every point of a sweep sees the same batches, so the rules stay comparable).
MAX_BATCHES = {"text": 16, "multihop": None, "propagation": None}
# Test-time depth: cycles as multiples of the trained count (C, 1.5C, 2C), on held-out examples up to
# a difficulty past the trained D: 2D for propagation; D + 2 for multi-hop, whose alphabet of 26
# variable names holds no more chains at the ladder's 3 queries and 2 distractors.
DEPTH_FACTORS = (1.0, 1.5, 2.0)
DEPTH_MAX_DIFFICULTY = {"multihop": lambda d: d + 2, "propagation": lambda d: 2 * d}


def sweep_path(results_dir: str, task: str, seed: int, rung: str = "ztt") -> str:
  return storage.join(results_dir, f"sweep_{result_stem(task, rung)}_s{seed}.json")


def depth_path(results_dir: str, task: str, seed: int, rung: str = "ztt") -> str:
  return storage.join(results_dir, f"depth_{result_stem(task, rung)}_s{seed}.json")


def _trained_runs(task, out, seeds, rung, paths, log):
  for seed in range(seeds):
    workdir = storage.join(storage.absolute(out), task, run_name(rung, seed))
    if all(storage.isfile(p(seed)) for p in paths):
      log(f"[{task}] {rung} seed {seed}: done, skipped")
      continue
    if not finished(workdir):
      log(f"[{task}] {rung} seed {seed}: {workdir} has not finished training; skipped")
      continue
    yield seed, workdir, restore.load_trained(workdir)


def sweep_ztt(task: str, out: str, results_dir: str, seeds: int, *, rung: str = "ztt",
              num_thresholds: int = 8, log=print):
  """Every exit rule the rung's model has (the learned gate's with exit_gate) on the same held-out
  batches, with mean cycles and accuracy by difficulty at each point; and on an embedded task,
  accuracy by difficulty at DEPTH_FACTORS x the trained cycles (depth extrapolation)."""
  storage.makedirs(results_dir)
  paths = [lambda s: sweep_path(results_dir, task, s, rung)]
  if task in SYNTHETIC_KINDS:
    paths.append(lambda s: depth_path(results_dir, task, s, rung))
  for seed, workdir, trained in _trained_runs(task, out, seeds, rung, paths, log):
    result = evaluator.sweep(trained, num_thresholds=num_thresholds, max_batches=MAX_BATCHES[task])
    result.update(task=task, seed=seed, rung=rung, workdir=workdir)
    evaluator.write_json(result, sweep_path(results_dir, task, seed, rung))
    log(f"[{task}] sweep seed {seed}: {len(result['points'])} points")
    if task in SYNTHETIC_KINDS:
      c = trained.cfg.model.cycles
      trained_d = evaluator.task_max_difficulty(trained.cfg.data)
      max_d = DEPTH_MAX_DIFFICULTY[task](trained_d)
      depth = {"task": task, "seed": seed, "rung": rung, "workdir": workdir, "trained_cycles": c,
               "trained_max_difficulty": trained_d, "max_difficulty": max_d, "points": []}
      for f in DEPTH_FACTORS:
        r = evaluator.evaluate(trained, ExitRule.from_config(trained.cfg.model).replace(threshold=None),
                               num_cycles=int(math.ceil(f * c)), max_difficulty=max_d)
        depth["points"].append({"num_cycles": r["num_cycles"], "accuracy": r["accuracy"],
                                "per_difficulty": r["per_difficulty"]})
        log(f"[{task}] depth seed {seed}: {r['num_cycles']} cycles, accuracy {r['accuracy']:.3f}")
      evaluator.write_json(depth, depth_path(results_dir, task, seed, rung))
