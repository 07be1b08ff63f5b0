"""The training loop: set up (or resume) a sharded run, train, log, evaluate, checkpoint."""
from __future__ import annotations

import dataclasses
import itertools
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
from ztt_jax.config import Config, to_dict
from ztt_jax.errors import ConfigError
from ztt_jax.flops import peak_flops, train_flops_per_token
from ztt_jax.metrics import MetricsWriter
from ztt_jax.model import ZTTModel
from ztt_jax.optimizer import lr_schedule, make_optimizer
from ztt_jax.train_step import TrainState, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step; shared by train, evaluate and export."""
  cfg: Config
  mesh: Any
  axis_rules: tuple
  model: ZTTModel
  tx: Any
  state_shardings: TrainState
  abstract_state: TrainState
  init: Any

  @property
  def param_shardings(self):
    return self.state_shardings.params


def validate_batch(cfg: Config, mesh) -> None:
  dp = partitioning.data_parallel_size(mesh)
  micro = cfg.train.global_batch_size // cfg.train.microbatches
  if micro % dp:
    raise ConfigError(
        f"train.global_batch_size={cfg.train.global_batch_size} / train.microbatches="
        f"{cfg.train.microbatches} = {micro} sequences per microbatch is not divisible by the "
        f"data-parallel degree {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}). "
        f"Use a global batch that is a multiple of {dp * cfg.train.microbatches}.")
  if cfg.train.global_batch_size % jax.process_count():
    raise ConfigError(
        f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
        f"{jax.process_count()} processes.")
  if dp % jax.process_count():
    # Each process feeds only its own rows; a batch split over fewer groups than processes would
    # need the same rows on several processes.
    raise ConfigError(
        f"the data-parallel degree {dp} (mesh data x fsdp) is smaller than, or not a multiple of, "
        f"the {jax.process_count()} processes. Put at least one data or fsdp slice on each process, "
        f"e.g. --config.mesh.shape='({jax.process_count()},-1,1)'.")


def build(cfg: Config, devices=None) -> Run:
  """Mesh, model, optimizer and the shardings of the train state; compiles nothing."""
  mesh = partitioning.make_mesh(cfg.mesh, devices)
  validate_batch(cfg, mesh)
  axis_rules = partitioning.rules(cfg.mesh)
  model = ZTTModel(cfg.model)
  tx = make_optimizer(cfg.train)
  dummy_BxT = jnp.zeros((1, cfg.data.seq_len), jnp.int32)

  def init_boxed(rng):
    return model.init(rng, dummy_BxT)["params"]

  # Made outside the mesh context: under it, an eager op would run on the mesh's devices, which
  # for ztt_jax.compile_check's TPU topologies exist only to compile for.
  key = jax.random.key(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    boxed = jax.eval_shape(init_boxed, key)
    p_shardings = partitioning.param_shardings(boxed, mesh, axis_rules)
    abstract_params = jax.eval_shape(lambda r: nn.unbox(init_boxed(r)), key)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
  o_shardings = partitioning.opt_state_shardings(tx, abstract_opt, p_shardings, mesh)  # runs eager ops
  repl = partitioning.replicated(mesh)
  state_shardings = TrainState(step=repl, params=p_shardings, opt_state=o_shardings, skipped_steps=repl)

  def init_state(rng):
    params = nn.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped_steps=jnp.zeros((), jnp.int32))

  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init_state, key)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  init = jax.jit(init_state, out_shardings=state_shardings)
  return Run(cfg, mesh, axis_rules, model, tx, state_shardings, abstract_state, init)


def jit_train_step(run: Run):
  """The sharded train step; `ztt_jax.compile_check` compiles this same function ahead of time."""
  return jax.jit(
      make_train_step(run.model, run.tx, run.cfg, run.mesh, lr_schedule(run.cfg.train)),
      in_shardings=(run.state_shardings, None),
      out_shardings=(run.state_shardings, partitioning.replicated(run.mesh)),
      donate_argnums=0)


def to_global(batch: dict, mesh) -> dict:
  sharding = partitioning.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def layout_metadata(run: Run) -> dict:
  m = run.cfg.model
  return {
      "config": to_dict(run.cfg),
      "layout": {
          "variant": m.variant,
          "num_cycles": m.cycles,
          "effective_depth": m.effective_depth,
          "scan_axes": {"cycles": "broadcast (shared params)", "middle layers": "params axis 0 ('layers')"},
      },
      "mesh": {"axes": list(run.mesh.axis_names), "shape": [int(s) for s in run.mesh.devices.shape]},
      "process_count": jax.process_count(),
      "jax_version": jax.__version__,
  }


class Evaluator:
  """Held-out loss, and for the multi-hop task accuracy and mean cycles per hop count.

  exit_threshold defaults to model.exit_threshold; calling with exit_threshold=tau evaluates
  another threshold with the same compiled step (None: no exit, a second compile). num_cycles,
  exit_signal and frozen_kv go to model.apply (ztt_jax.evaluate uses them for its baselines).
  """

  def __init__(self, run: Run, batches: list, *, exit_threshold="config", num_cycles=None,
               exit_signal="zero_attention", frozen_kv=None):
    self.run = run
    self.batches = batches
    self.exit_threshold = run.cfg.model.exit_threshold if exit_threshold == "config" else exit_threshold
    step = make_eval_step(run.model, None, num_cycles=num_cycles, exit_signal=exit_signal, frozen_kv=frozen_kv)
    repl = partitioning.replicated(run.mesh)
    self._fn = jax.jit(lambda p, b, tau: (step(p, b, tau), b.get("hops")),
                       in_shardings=(run.param_shardings, None, None), out_shardings=repl)

  def __call__(self, params, exit_threshold="same") -> dict:
    if not self.batches:  # eval.max_batches=0
      return {}
    tau = self.exit_threshold if exit_threshold == "same" else exit_threshold
    tau = None if tau is None else np.float32(tau)
    sums = {"ce": 0.0, "w": 0.0, "cycles": 0.0}
    per_hop: dict[int, list] = {}
    with jax.set_mesh(self.run.mesh), nn.logical_axis_rules(self.run.axis_rules):
      for local in self.batches:
        out, hops = jax.device_get(self._fn(params, to_global(local, self.run.mesh), tau))
        valid = out["weight_B"] > 0
        sums["ce"] += float(out["ce_sum_B"].sum())
        sums["w"] += float(out["weight_B"].sum())
        sums["cycles"] += float(out["cycles_sum_B"].sum())
        if hops is not None:
          for h, ok, cyc, w in zip(hops[valid], out["correct_B"][valid], out["cycles_sum_B"][valid],
                                   out["weight_B"][valid]):
            per_hop.setdefault(int(h), []).append((float(ok), float(cyc / w)))
    result = {"eval/loss": sums["ce"] / max(sums["w"], 1.0),
              "eval/mean_cycles": sums["cycles"] / max(sums["w"], 1.0)}
    if per_hop:
      all_ok = [ok for rows in per_hop.values() for ok, _ in rows]
      result["eval/accuracy"] = float(np.mean(all_ok))
      for h in sorted(per_hop):
        result[f"eval/accuracy_hops_{h}"] = float(np.mean([ok for ok, _ in per_hop[h]]))
        result[f"eval/mean_cycles_hops_{h}"] = float(np.mean([c for _, c in per_hop[h]]))
    return result


class _CompileThenSync:
  """Several processes: compile before the first call with each argument signature, then wait
  until every process has. Only process 0 writes JAX's persistent compilation cache, and on CPU the
  other processes' cache keys differ, so after a restart process 0 loads in a second what the
  others compile for a minute; CPU (Gloo) collectives fail when processes reach the first one more
  than 30 s apart. Waiting at the coordination service's barrier has no such limit."""

  _barriers = itertools.count()

  def __init__(self, jitted):
    self._jitted = jitted
    self._compiled = {}

  def __call__(self, *args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves))
    fn = self._compiled.get(key)
    if fn is None:
      fn = self._compiled[key] = self._jitted.lower(*args).compile()
      _wait_for_all_processes(f"ztt_jax_compiled_{next(self._barriers)}")
    return fn(*args)


def _wait_for_all_processes(name: str, timeout_s: int = 3600):
  from jax._src import distributed as jax_distributed  # the barrier of jax.distributed's client
  client = jax_distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, timeout_s * 1000)


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
      init = _CompileThenSync(run.init) if nproc > 1 else run.init
      state = init(jax.random.key(cfg.train.seed))

  writer = MetricsWriter(workdir, tensorboard=cfg.log.tensorboard)
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

  params_finite = jax.jit(_all_finite, out_shardings=partitioning.replicated(run.mesh))
  if nproc > 1:
    step_fn, params_finite = _CompileThenSync(step_fn), _CompileThenSync(params_finite)
    evaluator._fn = _CompileThenSync(evaluator._fn)
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
    hops = sorted(int(k.rsplit("_", 1)[1]) for k in eval_metrics if k.startswith("eval/accuracy_hops_"))
    for h in hops:
      lines.append(f"  hops={h}: accuracy {eval_metrics[f'eval/accuracy_hops_{h}']:.3f}, "
                   f"mean cycles {eval_metrics.get(f'eval/mean_cycles_hops_{h}', float('nan')):.2f}")
  return "\n".join(lines)


def init_from_export(path: str, run: Run) -> TrainState:
  """A fresh train state around an export's params. Skips the random init: compiling it costs more
  than the whole optimizer init, and its values would be thrown away."""
  params = load_init_params(path, run)
  opt_state = jax.jit(run.tx.init, out_shardings=run.state_shardings.opt_state)(params)
  def zero():  # one buffer each: the train step donates the whole state
    return jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings.step)
  return TrainState(step=zero(), params=params, opt_state=opt_state, skipped_steps=zero())


def load_init_params(path: str, run: Run):
  """Params of an exported checkpoint (see ztt_jax.export), placed with this run's shardings."""
  from ztt_jax.export import load  # export depends on the model only; imported lazily
  _, params = load(path)
  from ztt_jax.export import flatten
  want = {k: tuple(a.shape) for k, a in flatten(run.abstract_state.params).items()}
  got = {k: tuple(a.shape) for k, a in flatten(params).items()}
  if want != got:
    diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    raise ConfigError(
        f"init_from={path}: its params do not match this run's model config (differ: "
        + ", ".join(f"{k} {got.get(k)} vs run {want.get(k)}" for k in diff[:4])
        + (" ..." if len(diff) > 4 else "") + "). Use --config=configs/finetune.py:" + path
        + " (takes the model section from the export's config.json), or set the model section to it.")
  # A bfloat16 export fine-tunes in the run's param_dtype (e.g. float32 master weights).
  params = jax.tree.map(lambda a, w: a.astype(w.dtype), params, run.abstract_state.params)
  return jax.device_put(params, run.param_shardings)
