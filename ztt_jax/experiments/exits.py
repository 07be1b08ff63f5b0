"""Exit trade-off of the ladder's trained ztt: the evaluation module's sweep, saved per seed."""
from __future__ import annotations

import os

from ztt_jax import evaluate, restore
from ztt_jax.experiments.ladder import run_name
from ztt_jax.experiments.runs import finished

# Held-out batches per sweep point: all of multi-hop's 512 examples; 16 x 32 windows of text
# (every point of a sweep sees the same batches, so the rules stay comparable).
MAX_BATCHES = {"text": 16, "multihop": None}


def sweep_path(results_dir: str, task: str, seed: int) -> str:
  return os.path.join(results_dir, f"sweep_{task}_s{seed}.json")


def sweep_ztt(task: str, out: str, results_dir: str, seeds: int, *, num_thresholds: int = 8, log=print):
  for seed in range(seeds):
    path = sweep_path(results_dir, task, seed)
    workdir = os.path.join(out, task, run_name("ztt", seed))
    if os.path.isfile(path):
      log(f"[{task}] sweep seed {seed}: done, skipped")
      continue
    if not finished(workdir):
      log(f"[{task}] sweep seed {seed}: {workdir} has not finished training; skipped")
      continue
    trained = restore.load_trained(workdir)
    result = evaluate.sweep(trained, num_thresholds=num_thresholds, max_batches=MAX_BATCHES[task])
    result.update(task=task, seed=seed, workdir=workdir)
    evaluate.write_json(result, path)
    log(f"[{task}] sweep seed {seed}: wrote {path} ({len(result['points'])} points)")
