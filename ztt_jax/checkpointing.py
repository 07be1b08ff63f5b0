"""Orbax checkpoints: train state + Grain iterator + JSON metadata in one Composite per step.

Layout of WORKDIR/checkpoints/<step>/: `state` (sharded arrays), `data_iter` (Grain iterator state,
one file per process), `metadata` (JSON: the config, the model layout, the mesh, the data state).

Restoring walks back from the newest step: a damaged checkpoint (a truncated or missing array
file, a save killed half-way) is reported with a warning naming the step, and the next older one
is tried. Checkpoints that exist but cannot be restored never lead to a silent fresh start.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from ztt_jax.config import CheckpointConfig
from ztt_jax.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  metadata: dict
  data_iter_restored: bool


class Checkpointer:

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.directory = epath.Path(directory)
    self.cfg = cfg
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        ),
    )

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, metadata: dict, *, force: bool = False) -> bool:
    metadata = dict(metadata, data_iterator_state=data_iter.get_state())
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            metadata=ocp.args.JsonSave(_jsonable(metadata)),
        ),
        force=force,
    )

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def read_metadata(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

  def restore(self, abstract_state, data_iter=None, step: Optional[int] = None) -> Optional[Restored]:
    """Newest restorable checkpoint onto the shardings in `abstract_state`, or None if none exist.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding` for the CURRENT mesh, so a
    checkpoint saved on another mesh shape is resharded on load. `data_iter=None` skips the data
    iterator (evaluation, export); `step` restores exactly that step.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; available: {steps}.")
      steps = [step]
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            metadata=ocp.args.JsonRestore()))
        _check_complete(restored.state, abstract_state, step)
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
        msg = f"checkpoint step {step} in {self.directory} is damaged or unreadable ({type(e).__name__}: {e})"
        log.warning("%s; falling back to the previous checkpoint.", msg)
        failures.append(msg)
        continue
      data_ok = data_iter is not None and self._restore_data_iter(step, data_iter, restored.metadata)
      return Restored(step, restored.state, restored.metadata, data_ok)
    if self.cfg.allow_fresh_start:
      log.warning("No checkpoint in %s could be restored; starting fresh because "
                  "checkpoint.allow_fresh_start=True.", self.directory)
      return None
    raise CheckpointError(
        f"Checkpoints exist in {self.directory} (steps {steps}) but none could be restored:\n  "
        + "\n  ".join(failures)
        + "\nFix or remove the damaged step directories, or pass "
          "--config.checkpoint.allow_fresh_start=True to start from scratch.")

  def _restore_data_iter(self, step, data_iter, metadata) -> bool:
    """Restores the Grain iterator; if its per-process files don't match this run's process count,
    uses the process-independent state kept in the metadata (same global data order)."""
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
      return True
    except Exception as e:  # noqa: BLE001
      state = metadata.get("data_iterator_state")
      if state is None:
        raise CheckpointError(
            f"checkpoint step {step}: cannot restore the data iterator ({e}) and the metadata holds "
            "no data_iterator_state. Resume with the original process count.") from e
      log.info("step %d: data iterator restored from metadata (process count changed: %s)", step, e)
      data_iter.set_state(state)
      return False


def _check_complete(state, abstract_state, step):
  got = jax.tree_util.tree_structure(state)
  want = jax.tree_util.tree_structure(abstract_state)
  if got != want:
    raise CheckpointError(f"checkpoint step {step}: state tree does not match the model; "
                          "was it written by another model config?")


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  if hasattr(x, "item"):
    return x.item()
  return str(x)
