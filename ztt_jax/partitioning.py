"""Device mesh, logical-to-mesh axis rules, and the shardings of params, optimizer state and batches."""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ztt_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the single -1 entry with the remaining devices; checks the product."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(
          f"mesh.shape={shape} cannot fill {num_devices} devices: {num_devices} is not divisible by "
          f"{known}. Use a shape whose fixed entries divide the device count.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f"mesh.shape={shape} (axes {MESH_AXES}) has {math.prod(shape)} devices but "
        f"{num_devices} are available. Make the product equal {num_devices}, or put -1 in one entry, "
        "e.g. --config.mesh.shape='(-1,1,1)'.")
  return shape


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The mesh of the config's mesh section (config.MeshConfig) over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg.shape, len(devices))
  # Auto axes: Flax linen code is GSPMD-style; Explicit axes (the make_mesh default) break nn.Embed.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules(mesh_cfg) -> tuple:
  """The config's logical axis rules (config.MeshConfig) as Flax takes them. Axes the config does
  not name get their defaults: `kv_heads` (grouped-query k/v heads) goes where `heads` goes (and
  param_shardings replicates it when the mesh does not divide it), `lora` (per-cycle LoRA rank)
  nowhere."""
  out = tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_cfg.logical_axis_rules)
  named = dict(out)
  extra = (("kv_heads", named.get("heads")), ("lora", None))
  return out + tuple((name, ax) for name, ax in extra if name not in named)


def _kv_heads_rules(abstract_boxed_params, mesh, axis_rules) -> tuple:
  """axis_rules, with kv_heads replicated when its mesh axes do not divide the kv heads (e.g. 2 kv
  heads over tensor=4): grouped-query k/v are small, so copying them beats refusing the mesh."""
  named = dict(axis_rules)
  axes = named.get("kv_heads")
  if axes is None:
    return axis_rules
  parts = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  boxes = jax.tree.leaves(abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for box in boxes:
    names = getattr(box, "names", ())
    if "kv_heads" in names and box.value.shape[names.index("kv_heads")] % parts:
      n = box.value.shape[names.index("kv_heads")]
      log.warning("model.num_kv_heads=%d does not split over mesh axes %s (%d devices): the k/v projections "
               "are replicated there", n, axes, parts)
      return tuple((name, None if name == "kv_heads" else ax) for name, ax in axis_rules)
  return axis_rules


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


class BatchSplitError(ConfigError, DataError):
  """The global batch does not split over the processes or the data-parallel devices: a config
  mistake, which the data pipeline meets too."""


def check_batch_split(global_batch_size: int, processes: int, *, data_parallel: Optional[int] = None,
                      microbatches: int = 1, processes_name: Optional[str] = None) -> None:
  """Each process feeds its own rows of every global batch, so the batch splits evenly over the
  processes; given the data-parallel degree (mesh data x fsdp), each microbatch splits evenly over
  it, and no data-parallel group straddles two processes' rows. processes_name: how the message
  names the process count (default "the process count N")."""
  processes_name = processes_name or f"the process count {processes}"
  if data_parallel is not None and (global_batch_size // microbatches) % data_parallel:
    raise BatchSplitError(
        f"train.global_batch_size={global_batch_size} / train.microbatches={microbatches} = "
        f"{global_batch_size // microbatches} sequences per microbatch is not divisible by the "
        f"data-parallel degree {data_parallel} (mesh data x fsdp). Use a global batch that is a "
        f"multiple of {data_parallel * microbatches}.")
  if global_batch_size < 1 or global_batch_size % processes:
    raise BatchSplitError(
        f"train.global_batch_size={global_batch_size} is not divisible by {processes_name}. "
        f"Set it to a multiple of {processes}.")
  if data_parallel is not None and data_parallel % processes:
    # A batch split over fewer groups than processes would need the same rows on several processes.
    raise BatchSplitError(
        f"the data-parallel degree {data_parallel} (mesh data x fsdp) is smaller than, or not a "
        f"multiple of, {processes_name}. Put at least one data or fsdp slice on each process, "
        f"e.g. --config.mesh.shape='({processes},-1,1)'.")


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's rows of a batch (numpy, from the data pipeline) as global arrays split over the
  mesh's batch axes; every process calls it with its own rows, so no process holds the whole batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(abstract_boxed_params, mesh, axis_rules):
  """Shardings for the unboxed params, from the logical names on the boxed abstract params."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  axis_rules = _kv_heads_rules(abstract_boxed_params, mesh, axis_rules)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_shardings, mesh):
  """Optimizer moments follow their param's sharding; scalars (counts) are replicated.

  Without this, `jit(tx.init)` would leave the moments on one device.
  """
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated(mesh))


def indivisible_leaf(abstract_tree) -> Optional[str]:
  """A message naming the first array whose sharded dimension the mesh does not divide, or None.

  XLA's own error names the shape but not the parameter (and comes only after compiling); this
  names the parameter, e.g. a tensor axis of 4 over a model with 2 heads. `abstract_tree` holds
  `jax.ShapeDtypeStruct`s with `.sharding` (a Run's abstract_state)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
      continue
    mesh, spec = sharding.mesh, sharding.spec
    for dim, axes in enumerate(spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      parts = math.prod(mesh.shape[a] for a in axes)
      if leaf.shape[dim] % parts:
        name = jax.tree_util.keystr(path)
        return (f"{name} has shape {leaf.shape}; its dimension {dim} ({leaf.shape[dim]}) is split over "
                f"mesh axes {axes} = {parts} devices, which does not divide it. Change mesh.shape so "
                f"the {'x'.join(axes)} size divides {leaf.shape[dim]}, or change the model size, or "
                "map that logical axis to no mesh axis in mesh.logical_axis_rules.")
  return None


def check_divisible(abstract_tree) -> None:
  """ConfigError if the mesh cannot split some array (see `indivisible_leaf`); run before compiling."""
  problem = indivisible_leaf(abstract_tree)
  if problem is not None:
    raise ConfigError(f"mesh.shape does not fit the model: {problem}")
