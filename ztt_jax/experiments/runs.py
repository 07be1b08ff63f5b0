"""Training the ladder's runs, resumably: one work directory per (rung, seed) under OUT/TASK."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from ztt_jax import evaluator, restore
from ztt_jax import storage
from ztt_jax import run as run_lib
from ztt_jax.data.pipeline import open_source
from ztt_jax.data.sources import example_from_tokens
from ztt_jax.experiments.ladder import BASE_RUNGS, rung_config, run_name
from ztt_jax.metrics import flat, read_metrics
from ztt_jax.trainer import train

RESULT = "result.json"


def finished(workdir: str) -> bool:
  """result.json is written only after the trainer returns, so its presence means the run is done."""
  return storage.isfile(storage.join(workdir, RESULT))


def param_count(cfg) -> int:
  return int(sum(x.size for x in jax.tree.leaves(run_lib.build(cfg).abstract_state.params)))


def nanogpt_batches(cfg, *, num_batches: int = 20, batch_size: int = 12, seed: int = 1337) -> list:
  """nanoGPT's estimate_loss protocol on the run's held-out tail: num_batches batches of batch_size
  windows of seq_len + 1 tokens starting uniformly at random in the tail (seeded, so every rung and
  seed sees the same windows). Comparable with nanoGPT's published val loss for the same budget."""
  src = open_source(cfg.data)
  T = src.seq_len
  rng = np.random.default_rng(seed)
  lo, hi = src.num_train_tokens, len(src.tokens) - T - 1
  batches = []
  for _ in range(num_batches):
    rows = [example_from_tokens(np.asarray(src.tokens[s:s + T + 1]), T, src.pad_id)
            for s in rng.integers(lo, hi + 1, batch_size)]
    batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
  return batches


def nanogpt_loss(workdir: str) -> float:
  """Held-out nats per byte of a finished text run on nanoGPT's protocol (see nanogpt_batches)."""
  trained = restore.load_trained(workdir)
  return evaluator.evaluate(trained, batches=nanogpt_batches(trained.cfg))["loss"]


def train_one(task: str, rung: str, seed: int, out: str, *, data_path=None, steps=None) -> dict:
  cfg = rung_config(task, rung, seed, data_path=data_path, steps=steps)
  return train_and_record(cfg, storage.join(out, run_name(rung, seed)), {"task": task, "rung": rung, "seed": seed})


def train_and_record(cfg, workdir: str, meta: dict) -> dict:
  """Trains `cfg` in `workdir`, then writes workdir/result.json: `meta` plus the run's budget, size,
  speed, final metrics, load averages and (text) the nanoGPT-protocol loss. A preempted run writes
  nothing and returns the trainer's {"preempted_at": step}."""
  load_start = os.getloadavg()
  t0 = time.perf_counter()
  final = train(cfg, workdir)
  if "preempted_at" in final:
    return final
  rows = read_metrics(workdir)
  tok_s = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r]
  result = {
      **meta, "steps": cfg.train.steps,
      "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
      "params": param_count(cfg), "effective_depth": cfg.model.effective_depth,
      "variant": cfg.model.canonical_variant, "num_cycles": cfg.model.cycles,
      # wall time of this invocation only; a resumed run reports the last leg
      "wall_s": time.perf_counter() - t0,
      "median_tokens_per_sec": sorted(tok_s)[len(tok_s) // 2] if tok_s else None,
      "final": {k: float(v) for k, v in flat(final).items()},
      # 1/5/15-minute load averages before and after (the run itself adds ~1-2 on 2 cores)
      "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
  }
  if cfg.data.kind == "text":
    result["nanogpt_eval_loss"] = nanogpt_loss(workdir)
  storage.write_text(storage.join(workdir, RESULT), json.dumps(result, indent=1))
  return result


def run_ladder(task: str, out: str, seeds: int, *, data_path=None, steps=None, rungs=None, log=print):
  """Seed-major order, so a ladder stopped halfway has every rung at seed 0 before any at seed 1."""
  out = storage.join(storage.absolute(out), task)
  storage.makedirs(out)
  for seed in range(seeds):
    for rung in rungs or BASE_RUNGS:
      workdir = storage.join(out, run_name(rung, seed))
      if finished(workdir):
        log(f"[{task}] {run_name(rung, seed)}: done, skipped")
        continue
      log(f"[{task}] {run_name(rung, seed)}: training ({time.strftime('%H:%M:%S')})")
      r = train_one(task, rung, seed, out, data_path=data_path, steps=steps)
      if "preempted_at" in r:  # SIGTERM / Ctrl-C stops the ladder, not just this rung
        log(f"[{task}] {run_name(rung, seed)}: stopped at step {r['preempted_at']}; rerun the command to resume")
        return
      log(f"[{task}] {run_name(rung, seed)}: {json.dumps(r.get('final', r))} in {r.get('wall_s', 0):.0f}s")
