"""A run built from a config before its first step, shared by training, evaluation, export and the
compile check: mesh, model, optimizer, the train state's shardings, and how to feed it batches."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ztt_jax import export, partitioning
from ztt_jax.config import Config, to_dict
from ztt_jax.errors import ConfigError
from ztt_jax.model import ZTTModel
from ztt_jax.optimizer import lr_schedule, make_optimizer
from ztt_jax.train_step import TRAIN_STEP_STATIC, TrainState, make_train_step


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


def build(cfg: Config, devices=None) -> Run:
  """Mesh, model, optimizer and the shardings of the train state; compiles nothing."""
  mesh = partitioning.make_mesh(cfg.mesh, devices)
  partitioning.check_batch_split(cfg.train.global_batch_size, jax.process_count(),
                                 data_parallel=partitioning.data_parallel_size(mesh),
                                 microbatches=cfg.train.microbatches)
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
  """The sharded train step; `ztt_jax.compile_check` compiles this same function ahead of time.
  Called as step(state, batch) or step(state, batch, num_cycles): num_cycles (TRAIN_STEP_STATIC) is
  static, so jit keeps one program per cycle count (train.cycles_distribution; at most cycles_max)."""
  return jax.jit(
      make_train_step(run.model, run.tx, run.cfg, run.mesh, lr_schedule(run.cfg.train)),
      in_shardings=(run.state_shardings, None),
      out_shardings=(run.state_shardings, partitioning.replicated(run.mesh)),
      donate_argnums=0, static_argnums=TRAIN_STEP_STATIC)



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


# ------------------------------------------------------------------ several processes

def compile_synced(jitted, static_argnums: tuple = ()):
  """`jitted` itself on one process; on several, a wrapper that compiles before the first call
  with each argument signature and then waits until every process has (see _CompileThenSync).
  static_argnums: those of `jitted`; each of their values is its own program."""
  return _CompileThenSync(jitted, static_argnums) if jax.process_count() > 1 else jitted


class _CompileThenSync:
  """Only process 0 writes JAX's persistent compilation cache, and on CPU the other processes'
  cache keys differ, so after a restart process 0 loads in a second what the others compile for a
  minute; CPU (Gloo) collectives fail when processes reach the first one more than 30 s apart.
  Waiting at the coordination service's barrier has no such limit."""

  _barriers = itertools.count()

  def __init__(self, jitted, static_argnums: tuple = ()):
    self._jitted = jitted
    self._static = tuple(static_argnums)
    self._compiled = {}

  def __call__(self, *args):
    # A compiled program takes only the non-static arguments; the static ones are in its key.
    dynamic = tuple(a for i, a in enumerate(args) if i not in self._static)
    leaves, treedef = jax.tree_util.tree_flatten(dynamic)
    key = (treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves),
           tuple(args[i] for i in self._static if i < len(args)))
    fn = self._compiled.get(key)
    if fn is None:
      fn = self._compiled[key] = self._jitted.lower(*args).compile()
      _wait_for_all_processes(f"ztt_jax_compiled_{next(self._barriers)}")
    return fn(*dynamic)


def _wait_for_all_processes(name: str, timeout_s: int = 3600):
  from jax._src import distributed as jax_distributed  # the barrier of jax.distributed's client
  client = jax_distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, timeout_s * 1000)


# ------------------------------------------------------------------ init_from

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
  _, params = export.load(path)
  want = {k: tuple(a.shape) for k, a in traverse_util.flatten_dict(run.abstract_state.params, sep="/").items()}
  got = {k: tuple(a.shape) for k, a in traverse_util.flatten_dict(params, sep="/").items()}
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
