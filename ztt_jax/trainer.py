"""The training loop: set up (or resume) a sharded run, train, log, evaluate, checkpoint."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import psutil
from jax.experimental import multihost_utils

from ztt_jax import data as data_lib
from ztt_jax import partitioning
from ztt_jax.checkpointing import Checkpointer
from ztt_jax.config import Config
from ztt_jax.evaluate import Evaluator
from ztt_jax.flops import peak_flops, train_flops_per_token
from ztt_jax.metrics import MetricsWriter
from ztt_jax.run import build, compile_synced, init_from_export, jit_train_step, layout_metadata, to_global

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


def _preemption_service_running() -> bool:
  try:  # no public accessor; absent or renamed means "not running" and the fallback is used
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


class _PreemptionFlag:
  """A stop request (SIGTERM, or a preemption notice), seen by every process at the same step.

  With several processes and JAX's preemption service (started by jax.distributed.initialize),
  the service owns SIGTERM: a notice to any host becomes one agreed step on all of them through
  `reached_preemption_sync_point`, with no per-step collective. Installing a Python handler there
  would steal the signal from it. A single process handles SIGTERM itself; several processes
  without the service fall back to a Python handler plus an allgather every step.
  """

  def __init__(self):
    self.requested = False
    self.step = None  # the step being run, for the log line
    self._sync_service = jax.process_count() > 1 and _preemption_service_running()
    self._previous = None
    if not self._sync_service:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM received during step %s: will save a checkpoint after it and exit.", self.step)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._sync_service:
      stop = multihost_utils.reached_preemption_sync_point(step)
      if stop:
        log.warning("Preemption sync point reached at step %d: saving a checkpoint and exiting.", step)
      return stop
    stop = self.requested
    if jax.process_count() > 1:
      # Every process must agree, or the ones that stop would leave the others hanging in a collective.
      stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    return stop

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg: Config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final eval metrics.

  `devices` defaults to all devices of all processes.
  """
  cfg.validate()
  pid, nproc = jax.process_index(), jax.process_count()
  train_iter = data_lib.make_train_iterator(
      cfg.data, global_batch_size=cfg.train.global_batch_size, vocab_size=cfg.model.vocab_size,
      process_index=pid, process_count=nproc)
  eval_batches = [] if cfg.eval.max_batches == 0 else list(data_lib.make_eval_batches(
      cfg.data, global_batch_size=cfg.eval.batch_size or cfg.train.global_batch_size,
      vocab_size=cfg.model.vocab_size, process_index=pid, process_count=nproc,
      max_batches=cfg.eval.max_batches))
  run = build(cfg, devices)  # after the data checks: a bad file should fail in seconds

  checkpointer = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), cfg.checkpoint,
                              repair=True)
  restored = checkpointer.restore(run.abstract_state, train_iter)
  if restored is not None:
    state, start_step = restored.state, restored.step
    log.info("Resumed from checkpoint step %d in %s", start_step, workdir)
    saved_batch = restored.metadata.get("config", {}).get("train", {}).get("global_batch_size")
    if saved_batch and saved_batch != cfg.train.global_batch_size:
      log.warning(
          "train.global_batch_size changed from %d to %d: the data iterator counts global batches, so "
          "it resumes at example %d instead of %d (examples are skipped or repeated once).",
          saved_batch, cfg.train.global_batch_size,
          restored.metadata.get("data_iterator_state", {}).get("next_index", 0) * cfg.train.global_batch_size,
          restored.metadata.get("data_iterator_state", {}).get("next_index", 0) * saved_batch)
  else:
    start_step = 0
    if cfg.init_from:
      state = init_from_export(cfg.init_from, run)
      log.info("Initialised params from %s", cfg.init_from)
    else:
      state = compile_synced(run.init)(jax.random.key(cfg.train.seed))

  writer = MetricsWriter(workdir, enabled=pid == 0, tensorboard=cfg.log.tensorboard)
  metadata = layout_metadata(run)
  step_fn = jit_train_step(run)
  evaluator = Evaluator(run, eval_batches)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  flops_per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
  peak = peak_flops(cfg.train.peak_flops_per_device) * nproc
  preemption = _PreemptionFlag()
  eval_metrics: dict = {}
  pending = None  # (step, metrics) of the previous step, checked one step late to keep dispatch async
  t_last, step_last = time.perf_counter(), start_step
  step = start_step

  def check_finite(step_done, metrics):
    if cfg.train.nonfinite == "raise" and not bool(metrics["finite"]):
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {step_done} (loss={float(metrics['loss'])}); the update "
          "was not applied and nothing non-finite was saved. Lower train.learning_rate, check the data, "
          "or set --config.train.nonfinite=skip to drop such steps.")

  step_fn = compile_synced(step_fn)
  params_finite = compile_synced(jax.jit(_all_finite, out_shardings=partitioning.replicated(run.mesh)))
  ckpt_block = [0.0]  # seconds the loop spent blocked in checkpoint saves since the last log line
  saved_at = [start_step if restored is not None else None]

  def save(step_done, force):
    check_finite(*pending)  # raise mode: a step whose update was dropped never gets a checkpoint
    if not bool(params_finite(state.params)):
      # The step only guards the loss and gradient; an update can still overflow the params.
      raise NonFiniteLossError(
          f"The params are non-finite after step {step_done} (an update overflowed); not saving it. "
          "Lower train.learning_rate or tighten train.grad_clip_norm and resume from the last checkpoint.")
    t0 = time.perf_counter()
    checkpointer.save(step_done, state, train_iter, metadata, force=force)
    ckpt_block[0] += time.perf_counter() - t0
    saved_at[0] = step_done

  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.axis_rules):
      for step in range(start_step + 1, cfg.train.steps + 1):
        preemption.step = step
        batch = to_global(next(train_iter), run.mesh)
        state, metrics = step_fn(state, batch)
        if pending is not None:
          check_finite(*pending)
        pending = (step, metrics)
        is_last = step == cfg.train.steps

        if step % cfg.log.every_steps == 0 or is_last:
          check_finite(*pending)
          m = jax.device_get(metrics)
          now = time.perf_counter()
          tok_s = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          scalars = {
              "train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
              "train/tokens_per_sec": tok_s,
              "train/mfu": flops_per_step / tokens_per_step * tok_s / peak,
              "train/skipped_steps": m["skipped_steps"],
              "train/checkpoint_block_sec": ckpt_block[0],
              "train/rss_mb": psutil.Process().memory_info().rss / 2**20,
          }
          ckpt_block[0] = 0.0
          if cfg.model.use_zero_token:
            for c, v in enumerate(np.asarray(m["zero_attention_C"])):
              scalars[f"train/zero_attention_cycle_{c}"] = v
          if step % cfg.eval.every_steps == 0 or is_last:
            eval_metrics = evaluator(state.params)
            scalars.update(eval_metrics)
          writer.write(step, scalars)
          t_last = time.perf_counter()  # eval time is not training throughput
          if pid == 0:
            eta = (cfg.train.steps - step) * tokens_per_step / max(tok_s, 1e-9)
            print(f"step {step}/{cfg.train.steps} | loss {m['loss']:.4f} | {tok_s:,.0f} tok/s | "
                  f"MFU {100 * scalars['train/mfu']:.2f}% | ETA {_format_eta(eta)}"
                  + (f" | eval loss {eval_metrics['eval/loss']:.4f}" if "eval/loss" in scalars else ""),
                  flush=True)
        elif step % cfg.eval.every_steps == 0:
          eval_metrics = evaluator(state.params)
          writer.write(step, eval_metrics)

        if step % cfg.checkpoint.every_steps == 0 or is_last:
          save(step, force=is_last)
        if not is_last and preemption.should_stop(step):
          if saved_at[0] != step:  # Orbax refuses a second save of the same step
            save(step, force=True)
          checkpointer.wait()
          log.warning("Preempted: saved checkpoint at step %d; exiting.", step)
          if pid == 0:
            print(f"Preempted at step {step}: checkpoint saved, exiting cleanly.", flush=True)
          return {"preempted_at": step, **eval_metrics}
  finally:
    checkpointer.close()
    writer.close()
    preemption.restore()

  if not eval_metrics and start_step >= cfg.train.steps:
    eval_metrics = evaluator(state.params)
  if pid == 0:
    print(summary(eval_metrics), flush=True)
  return eval_metrics


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def summary(eval_metrics: dict) -> str:
  if not eval_metrics:
    return "final eval: off (eval.max_batches=0)"
  lines = [f"final eval: loss {eval_metrics.get('eval/loss', float('nan')):.4f}, "
           f"mean cycles used {eval_metrics.get('eval/mean_cycles', float('nan')):.2f}"]
  if "eval/accuracy" in eval_metrics:
    lines.append(f"  accuracy (all hops): {eval_metrics['eval/accuracy']:.3f}")
    for h, hop in eval_metrics["eval/per_hop"].items():
      lines.append(f"  hops={h}: accuracy {hop['accuracy']:.3f}, mean cycles {hop['mean_cycles']:.2f}")
  return "\n".join(lines)
