"""Load a trained run from its work directory: the config stored in the checkpoint, the model and
its params. Shared by evaluation, generation and export, which need no training config;
`export_run` writes one of its checkpoints as a params-only export. The other way round,
`init_from_export` starts a run (train.init_from) from an export's params."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from ztt_jax import config as config_lib
from ztt_jax import export
from ztt_jax import run as run_lib
from ztt_jax import storage as paths
from ztt_jax.checkpointing import Checkpointer
from ztt_jax.errors import CheckpointError, ConfigError
from ztt_jax.train_step import TrainState


@dataclasses.dataclass
class TrainedRun:
  cfg: config_lib.Config
  run: run_lib.Run
  params: Any
  step: int


def load_trained(workdir: str, step: Optional[int] = None, devices=None) -> TrainedRun:
  """Params of checkpoint `step` (default: newest good one) placed on `devices` (default: all)."""
  ckpt_dir = paths.join(paths.absolute(workdir), "checkpoints")
  if not paths.isdir(ckpt_dir):
    raise CheckpointError(f"No checkpoints in {workdir}: expected {ckpt_dir}. Pass the --workdir of a "
                          "training run (python -m ztt_jax.train ... --workdir=DIR).")
  probe = Checkpointer(ckpt_dir, config_lib.CheckpointConfig())
  steps = probe.all_steps()
  if not steps:
    raise CheckpointError(f"{ckpt_dir} holds no finished checkpoint.")
  if step is not None and step not in steps:
    raise CheckpointError(f"No checkpoint for step {step} in {ckpt_dir}; available: {steps}. Pass one of "
                          "them as --step, or omit --step for the newest.")
  meta = probe.read_metadata(step if step is not None else steps[-1])
  cfg = config_lib.parse(meta["config"])
  # The saved mesh may not fit this machine: reshard onto a data-parallel mesh of as many devices
  # as divide the batch, so the stored batch sizes stay valid.
  devices = list(devices or jax.devices())
  micro_batch = cfg.train.global_batch_size // cfg.train.microbatches
  devices = devices[:math.gcd(len(devices), micro_batch, cfg.eval.batch_size or micro_batch)]
  cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, shape=(-1, 1, 1)))
  run = run_lib.build(cfg, devices)
  restored = probe.restore(run.abstract_state, None, step=step)
  probe.close()
  return TrainedRun(cfg, run, restored.state.params, restored.step)


def export_run(workdir: str, out: str, step: Optional[int] = None, storage: str = "safetensors",
               unscanned: bool = False, dtype: Optional[str] = None, overwrite: bool = False) -> str:
  """Exports checkpoint `step` (default: the newest) of the training run in `workdir` to `out`."""
  sources = {"--workdir": workdir}
  export.check_out(out, overwrite=overwrite, sources=sources)  # before the minutes of loading the run
  # Local devices only: the export is written by this process, so every array must be addressable here.
  trained = load_trained(workdir, step, devices=jax.local_devices())
  source = {"kind": "training_run", "workdir": paths.absolute(workdir), "step": int(trained.step)}
  return export.save(out, trained.cfg.model, trained.params, storage=storage, unscanned=unscanned,
                     dtype=dtype, source=source, overwrite=overwrite, sources=sources)


# ------------------------------------------------------------------ init_from: an export into a run

def init_from_export(path: str, run: run_lib.Run) -> TrainState:
  """A fresh train state around an export's params. Skips the random init: compiling it costs more
  than the whole optimizer init, and its values would be thrown away."""
  params = load_init_params(path, run)
  opt_state = jax.jit(run.tx.init, out_shardings=run.state_shardings.opt_state)(params)
  def zero():  # one buffer each: the train step donates the whole state
    return jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings.step)
  return TrainState(step=zero(), params=params, opt_state=opt_state, skipped_steps=zero())


def load_init_params(path: str, run: run_lib.Run):
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
