"""The training loop: set up (or resume) a sharded run, then step it. Logging, evaluation,
checkpointing and stop requests are hooks, each with its own cadence."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import psutil

from ztt_jax import data as data_lib
from ztt_jax import outdir, partitioning, resume, storage
from ztt_jax.checkpointing import Checkpointer, saved_metadata
from ztt_jax.config import Config
from ztt_jax.data.fingerprint import fingerprint
from ztt_jax.data.pipeline import local_data
from ztt_jax.distributed import compile_synced
from ztt_jax.errors import DiskFullError, is_disk_full
from ztt_jax.evaluator import Evaluator
from ztt_jax.flops import peak_flops_info, train_flops_per_token
from ztt_jax.lease import Lease
from ztt_jax.metrics import MetricsWriter, eval_summary
from ztt_jax.partitioning import to_global
from ztt_jax.preemption import StopRequest
from ztt_jax.restore import init_from_export
from ztt_jax.run import Run, build, jit_train_step, layout_metadata
from ztt_jax.train_step import RECIPE_METRICS, TRAIN_STEP_STATIC, TrainState, sampled_cycles

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class StepInfo:
  """What the hooks see after a step."""
  step: int
  state: TrainState
  metrics: dict  # the step's metrics, still on device
  is_last: bool
  record: Optional[dict] = None  # what the step writes to metrics.jsonl; None: no line
  stop: bool = False  # a hook ends the loop after this step

  def log(self, scalars: dict):
    self.record = {**(self.record or {}), **scalars}


class Hooks:
  """Functions called after a step whose number is a multiple of their `every`, and after the last
  step, in the order they were added (Levanter's `add_hook(fn, every=N)`)."""

  def __init__(self):
    self._hooks: list[tuple[Callable[[StepInfo], None], int]] = []

  def add(self, fn: Callable[[StepInfo], None], every: int = 1):
    self._hooks.append((fn, every))

  def __call__(self, info: StepInfo):
    for fn, every in self._hooks:
      if info.is_last or info.step % every == 0:
        fn(info)


def train(cfg: Config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final eval metrics.

  `devices` defaults to all devices of all processes.
  """
  cfg.validate()
  workdir = outdir.check_workdir(workdir)
  ckpt_dir = storage.join(workdir, "checkpoints")
  saved = saved_metadata(ckpt_dir)
  _check_resume(saved, cfg, workdir)  # first: a changed config is named before data or compiling
  train_iter, eval_batches = _data(cfg)
  data_fingerprint = fingerprint(local_data(cfg.data))  # of the local copy of data in a bucket
  if saved is not None:  # after opening the data (which names a missing or bad file), before compiling
    resume.check_data(saved[1].get("data_fingerprint"), data_fingerprint, cfg, workdir=workdir, step=saved[0])
  run = build(cfg, devices)  # after the data checks: a bad file should fail in seconds
  partitioning.check_divisible(run.abstract_state)  # e.g. a tensor axis that does not divide the heads
  outdir.make_workdir(workdir, ckpt_dir)  # only now: a run stopped by a bad config leaves nothing
  # Before the checkpointer (which repairs damaged saves) and anything compiled: one writer per workdir.
  holder = Lease(workdir, cfg.checkpoint.lease_timeout_s) if jax.process_index() == 0 else None
  if holder is not None:
    holder.acquire()
  try:
    return _train(cfg, workdir, ckpt_dir, run, train_iter, eval_batches, holder, data_fingerprint)
  except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
    if not is_disk_full(e) or isinstance(e, DiskFullError):
      raise
    kept = saved_metadata(ckpt_dir)
    raise DiskFullError(  # metrics, TensorBoard or the lease: the checkpointer names its own saves
        f"No space left on device writing to --workdir={workdir} ({getattr(e, 'filename', None) or e}). "
        + (f"The last good checkpoint, step {kept[0]}, is kept: free some space and rerun the same command "
           "to resume from it." if kept else "No checkpoint was saved yet: free some space and rerun.")) from None
  finally:
    if holder is not None:
      holder.release()


def _train(cfg: Config, workdir: str, ckpt_dir: str, run: Run, train_iter, eval_batches,
           holder: Optional[Lease], data_fingerprint: Optional[dict]) -> dict:
  checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint, repair=True)
  try:
    state, start_step, resumed = _first_state(run, checkpointer, train_iter, workdir)
  except BaseException:
    checkpointer.close()
    raise
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=cfg.log.tensorboard,
                         start_step=start_step)
  step_fn = compile_synced(jit_train_step(run), TRAIN_STEP_STATIC)
  guard = _FiniteGuard(cfg.train.nonfinite == "raise")
  saver = _Saver(run, checkpointer, train_iter, guard, saved_step=start_step if resumed else None,
                 data_fingerprint=data_fingerprint)
  evaluation = _Evaluation(Evaluator(run, eval_batches))
  progress = _Progress(cfg, start_step, guard, saver)
  stop_request = StopRequest(last_step=start_step)
  hooks = Hooks()
  if holder is not None:  # first: a run that lost its lease writes nothing more
    hooks.add(lambda info: holder.refresh())
  hooks.add(progress.log, every=cfg.log.every_steps)
  hooks.add(evaluation, every=cfg.eval.every_steps)
  hooks.add(_record_writer(writer))
  hooks.add(progress.print_line, every=cfg.log.every_steps)
  hooks.add(saver, every=cfg.checkpoint.every_steps)
  hooks.add(_stop_hook(stop_request, saver, ckpt_dir))

  # Exits in reverse: the checkpointer is closed (waiting for its last save) before the SIGTERM
  # handler is put back, so a signal then cannot kill a save half-way.
  with stop_request, contextlib.closing(writer), contextlib.closing(checkpointer), \
      jax.set_mesh(run.mesh), nn.logical_axis_rules(run.axis_rules):
    for step in range(start_step + 1, cfg.train.steps + 1):
      state, metrics = step_fn(state, to_global(next(train_iter), run.mesh), sampled_cycles(cfg, step))
      guard.step_done(step, metrics)
      info = StepInfo(step, state, metrics, is_last=step == cfg.train.steps)
      hooks(info)
      if info.stop:
        return {"preempted_at": step, **evaluation.latest}

  if not evaluation.latest and start_step >= cfg.train.steps:
    evaluation.latest = evaluation.evaluator(state.params)
  if jax.process_index() == 0:
    print(eval_summary(evaluation.latest), flush=True)
  return evaluation.latest


def _check_resume(saved: Optional[tuple[int, dict]], cfg: Config, workdir: str) -> None:
  """Compares the config saved in the newest checkpoint with `cfg` (see ztt_jax/resume.py)."""
  if saved is not None:
    resume.check(saved[1]["config"], cfg, workdir=workdir, step=saved[0])


def _data(cfg: Config) -> tuple:
  """This process's train iterator and held-out batches."""
  pid, nproc = jax.process_index(), jax.process_count()
  train_iter = data_lib.make_train_iterator(
      cfg.data, global_batch_size=cfg.train.global_batch_size, vocab_size=cfg.model.vocab_size,
      process_index=pid, process_count=nproc)
  eval_batches = [] if cfg.eval.max_batches == 0 else list(data_lib.make_eval_batches(
      cfg.data, global_batch_size=cfg.eval.batch_size or cfg.train.global_batch_size,
      vocab_size=cfg.model.vocab_size, process_index=pid, process_count=nproc,
      max_batches=cfg.eval.max_batches))
  return train_iter, eval_batches


def _first_state(run: Run, checkpointer: Checkpointer, train_iter, workdir: str) -> tuple:
  """(state, its step, whether it was resumed): the newest good checkpoint, else init_from, else
  a random init."""
  cfg = run.cfg
  restored = checkpointer.restore(run.abstract_state, train_iter)
  if restored is not None:
    log.info("Resumed from checkpoint step %d in %s", restored.step, workdir)
    saved_batch = restored.metadata.get("config", {}).get("train", {}).get("global_batch_size")
    if saved_batch and saved_batch != cfg.train.global_batch_size:
      next_index = restored.metadata.get("data_iterator_state", {}).get("next_index", 0)
      log.warning(
          "train.global_batch_size changed from %d to %d: the data iterator counts global batches, so "
          "it resumes at example %d instead of %d (examples are skipped or repeated once).",
          saved_batch, cfg.train.global_batch_size, next_index * cfg.train.global_batch_size,
          next_index * saved_batch)
    return restored.state, restored.step, True
  if cfg.init_from:
    state = init_from_export(cfg.init_from, run)
    log.info("Initialised params from %s", cfg.init_from)
    return state, 0, False
  return compile_synced(run.init)(jax.random.key(cfg.train.seed)), 0, False


class _FiniteGuard:
  """train.nonfinite=raise: stops at the first step whose loss or gradient was non-finite (the
  step itself dropped the update). A step's flag is read once the next step has been dispatched,
  so reading it does not stall the device; log lines and checkpoints read their own step's."""

  def __init__(self, enabled: bool):
    self.enabled, self._previous = enabled, None

  def step_done(self, step: int, metrics: dict):
    if self._previous is not None:
      self.check(*self._previous)
    self._previous = (step, metrics)

  def check(self, step: int, metrics: dict):
    if self.enabled and not bool(metrics["finite"]):
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); the update "
          "was not applied and nothing non-finite was saved. Lower train.learning_rate, check the data, "
          "or set --config.train.nonfinite=skip to drop such steps.")


class _Saver:
  """The checkpoint hook. Never saves a step whose update was dropped, nor non-finite params."""

  def __init__(self, run: Run, checkpointer: Checkpointer, train_iter, guard: _FiniteGuard,
               saved_step: Optional[int], data_fingerprint: Optional[dict]):
    self.checkpointer, self.train_iter, self.guard = checkpointer, train_iter, guard
    self.metadata = dict(layout_metadata(run), data_fingerprint=data_fingerprint)
    self.params_finite = compile_synced(jax.jit(_all_finite, out_shardings=partitioning.replicated(run.mesh)))
    self.saved_step = saved_step
    self.blocked_s = 0.0  # seconds the loop waited on saves since the last log line

  def __call__(self, info: StepInfo):
    self.save(info, force=info.is_last)

  def save(self, info: StepInfo, force: bool):
    self.guard.check(info.step, info.metrics)
    if not bool(self.params_finite(info.state.params)):
      # The step only guards the loss and gradient; an update can still overflow the params.
      raise NonFiniteLossError(
          f"The params are non-finite after step {info.step} (an update overflowed); not saving it. "
          "Lower train.learning_rate or tighten train.grad_clip_norm and resume from the last checkpoint.")
    t0 = time.perf_counter()
    self.checkpointer.save(info.step, info.state, self.train_iter, self.metadata, force=force)
    self.blocked_s += time.perf_counter() - t0
    self.saved_step = info.step

  def take_blocked_s(self) -> float:
    blocked, self.blocked_s = self.blocked_s, 0.0
    return blocked


def _record_writer(writer: MetricsWriter):
  def hook(info: StepInfo):
    if info.record is not None:
      writer.write(info.step, info.record)
  return hook


def _stop_hook(stop_request: StopRequest, saver: _Saver, ckpt_dir: str):
  def hook(info: StepInfo):
    if info.is_last or not stop_request.should_stop(info.step):
      return
    if saver.saved_step != info.step:  # Orbax refuses a second save of the same step
      saver.save(info, force=True)
    saver.checkpointer.wait()
    log.warning("Preempted: saved checkpoint at step %d; exiting.", info.step)
    if jax.process_index() == 0:
      print(stop_request.stop_line(info.step, ckpt_dir), flush=True)
    info.stop = True
  return hook


class _Evaluation:
  """The eval hook; keeps the latest metrics, which train() returns."""

  def __init__(self, evaluator: Evaluator):
    self.evaluator, self.latest = evaluator, {}

  def __call__(self, info: StepInfo):
    self.latest = self.evaluator(info.state.params)
    info.log(self.latest)


class _Progress:
  """The train/* scalars of a log step, and after the step's record is written its progress line."""

  def __init__(self, cfg: Config, start_step: int, guard: _FiniteGuard, saver: _Saver):
    self.cfg, self.guard, self.saver = cfg, guard, saver
    self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    self.flops_per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * self.tokens_per_step
    # Cached per machine (ztt_jax.flops), so two runs of one shape report comparable MFU; the
    # peak used goes into every log record. Compute-dtype peak: bf16 matmuls have their own.
    peak = peak_flops_info(cfg.train.peak_flops_per_device, dtype=cfg.model.dtype)
    self.peak = peak["total"] * jax.process_count()
    self.peak_per_device = peak["per_device"]
    self._t, self._step = time.perf_counter(), start_step

  def log(self, info: StepInfo):
    self.guard.check(info.step, info.metrics)
    m = jax.device_get(info.metrics)
    now = time.perf_counter()
    tok_s = self.tokens_per_step * (info.step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, info.step
    scalars = {
        "train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
        "train/tokens_per_sec": tok_s,
        "train/mfu": self.flops_per_step / self.tokens_per_step * tok_s / self.peak,
        "train/peak_flops_per_device": self.peak_per_device,
        "train/skipped_steps": m["skipped_steps"],
        "train/checkpoint_block_sec": self.saver.take_blocked_s(),
        "train/rss_mb": psutil.Process().memory_info().rss / 2**20,
        **{f"train/{k}": m[k] for k in RECIPE_METRICS if k in m},
    }
    if self.cfg.model.use_zero_token:
      scalars.update({f"train/zero_attention_cycle_{c}": v for c, v in enumerate(np.asarray(m["zero_attention_C"]))})
    info.log(scalars)

  def print_line(self, info: StepInfo):
    self._t = time.perf_counter()  # eval time is not training throughput
    if jax.process_index() != 0:
      return
    r, steps = info.record, self.cfg.train.steps
    eta = (steps - info.step) * self.tokens_per_step / max(r["train/tokens_per_sec"], 1e-9)
    print(f"step {info.step}/{steps} | loss {r['train/loss']:.4f} | {r['train/tokens_per_sec']:,.0f} tok/s | "
          f"MFU {100 * r['train/mfu']:.2f}% | ETA {_format_eta(eta)}"
          + (f" | eval loss {r['eval/loss']:.4f}" if "eval/loss" in r else ""), flush=True)


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  h, m, s = int(seconds) // 3600, int(seconds) // 60 % 60, int(seconds) % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
