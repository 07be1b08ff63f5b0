"""A run built from a config before its first step, shared by training, evaluation, export and the
compile check: mesh, model, optimizer and the train state's shardings. Feeding it batches is
partitioning.to_global; starting it from an export is restore.init_from_export."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax import partitioning
from ztt_jax.config import Config, to_dict
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
  # The model's init is traced once here and once by the jit below: each trace of a looped model
  # costs about a second, paid by every run, restore and export.
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    boxed = jax.eval_shape(init_boxed, key)
    p_shardings = partitioning.param_shardings(boxed, mesh, axis_rules)
  # Unboxed outside the mesh, where Flax adds no sharding constraint (which shapes alone cannot take).
  abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 nn.unbox(boxed), p_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
  o_shardings = partitioning.opt_state_shardings(tx, abstract_opt, p_shardings, mesh)  # runs eager ops
  repl = partitioning.replicated(mesh)
  state_shardings = TrainState(step=repl, params=p_shardings, opt_state=o_shardings, skipped_steps=repl)

  def init_state(rng):
    params = nn.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped_steps=jnp.zeros((), jnp.int32))

  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt, skipped_steps=scalar)
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

