"""Orbax checkpoints: train state + Grain iterator + JSON metadata in one Composite per step.

Layout of WORKDIR/checkpoints/<step>/: `state` (sharded arrays), `data_iter` (Grain iterator state,
one file per process), `metadata` (JSON: the config, the model layout, the mesh, the data state).

Restoring walks back from the newest step: a damaged checkpoint (a truncated or missing array
file, a save killed half-way) is reported with a warning naming the step, and the next older one
is tried. Checkpoints that exist but cannot be restored never lead to a silent fresh start.

A checkpoint whose params have other shapes than the model being restored is not damaged: it was
written by another model config. That is a ConfigError before anything is read, and nothing is
moved or renamed. (The trainer compares the saved config with the new one first, see
ztt_jax/resume.py; this check is the backstop that needs no config.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ztt_jax.config import CheckpointConfig
from ztt_jax.errors import CheckpointError, ConfigError, DiskFullError, is_disk_full

log = logging.getLogger(__name__)

_TMP_MARKER = ".orbax-checkpoint-tmp"


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  metadata: dict
  data_iter_restored: bool


class Checkpointer:
  """`repair=True` is for the run that owns the directory (the trainer): on open it removes
  half-written saves, and on restore it moves damaged steps aside (`<step>.damaged`) so later saves
  of those step numbers are possible. Readers (evaluation, export) leave the directory as it is."""

  def __init__(self, directory: str, cfg: CheckpointConfig, *, repair: bool = False):
    self.directory = epath.Path(directory)
    self.cfg = cfg
    self.repair = repair
    if repair and jax.process_index() == 0 and self.directory.exists():
      for leftover in sorted(p.name for p in self.directory.iterdir() if _TMP_MARKER in p.name):
        log.warning("Removing %s/%s: a checkpoint save that never finished (the process was killed "
                    "during it).", self.directory, leftover)
    self._in_flight: Optional[tuple[int, int]] = None  # (step, bytes) of the save not yet finished
    _quiet_disk_full_logs()
    _split_only_large_arrays(cfg.replica_parallel_min_bytes)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=repair,
        ),
    )

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, metadata: dict, *, force: bool = False) -> bool:
    metadata = dict(metadata, data_iterator_state=data_iter.get_state())
    nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    with self._disk_full_is_one_line(step, nbytes):  # an async save fails at the next call
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data_iter=grain.checkpoint.CheckpointSave(data_iter),
              metadata=ocp.args.JsonSave(_jsonable(metadata)),
          ),
          force=force,
      )
    if saved:
      self._in_flight = (step, nbytes)
    return saved

  def wait(self):
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()
    self._in_flight = None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()

  @contextlib.contextmanager
  def _disk_full_is_one_line(self, step: Optional[int] = None, nbytes: int = 0):
    """Out of space during a save (this one, or the async one before it) -> DiskFullError naming
    the directory, the size of a save, the free space and the checkpoint that is kept."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
      if not is_disk_full(e):
        raise
      failed, size = self._in_flight or (step, nbytes)
      kept = [s for s in self.all_steps() if s != failed]
      free = shutil.disk_usage(str(self.directory)).free if self.directory.exists() else 0
      raise DiskFullError(
          f"No space left on device saving checkpoint step {failed} in {self.directory} (a save needs about "
          f"{size / 2**20:.1f} MiB; {free / 2**20:.1f} MiB free). "
          + (f"The last good checkpoint, step {kept[-1]}, is kept: free some space (or lower "
             "checkpoint.max_to_keep) and rerun the same command to resume from it."
             if kept else "No earlier checkpoint exists: free some space and rerun.")) from None

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
    failures, damaged = [], []
    for candidate in reversed(steps):
      mismatch = self._params_mismatch(candidate, abstract_state)
      if mismatch is not None:
        raise ConfigError(
            f"checkpoint step {candidate} in {self.directory} was written by a model of another shape "
            f"({mismatch}); it is not damaged and was left as it is. Resume with the model config it was "
            "saved with (it is in the checkpoint's metadata), or use a new --workdir for the new model.")
      state, metadata, error = self._try_restore(candidate, abstract_state)
      # Every process must take the same step, or they would train from different states.
      if not _all_processes_agree(error is None) and error is None:
        error = "unreadable on another process (see its log)"
      if error is not None:
        msg = f"checkpoint step {candidate} in {self.directory} is damaged or unreadable ({error})"
        log.warning("%s; falling back to the previous checkpoint.", msg)
        failures.append(msg)
        damaged.append(candidate)
        continue
      self._set_aside(damaged)
      data_ok = data_iter is not None and self._restore_data_iter(candidate, data_iter, metadata)
      return Restored(candidate, state, metadata, data_ok)
    if self.cfg.allow_fresh_start and step is None:
      log.warning("No checkpoint in %s could be restored (steps %s); starting fresh because "
                  "checkpoint.allow_fresh_start=True.", self.directory, steps)
      self._set_aside(damaged)
      return None
    raise CheckpointError(
        f"Checkpoints exist in {self.directory} (steps {steps}) but none could be restored:\n  "
        + "\n  ".join(failures)
        + "\nFix or remove the damaged step directories, or pass "
          "--config.checkpoint.allow_fresh_start=True to start from scratch.")

  def _params_mismatch(self, step: int, abstract_state) -> Optional[str]:
    """What differs between the saved params' shapes (from the array metadata, no array read) and
    the model's, or None if they match or the metadata is unreadable (then restoring reports it)."""
    try:
      meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
      saved = _shapes(getattr(meta, "tree", meta)["params"])
    except Exception:  # noqa: BLE001 - unreadable metadata is damage, which restoring handles
      return None
    want = _shapes(abstract_state.params)
    if saved == want:
      return None
    diff = [f"{k}: saved {saved.get(k, 'absent')}, model {want.get(k, 'absent')}"
            for k in sorted(saved.keys() | want.keys()) if saved.get(k) != want.get(k)]
    return "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")

  def _try_restore(self, step: int, abstract_state):
    """(state, metadata, None) or (None, None, error). Uses the item handlers directly: the
    manager's restore ends in a cross-process barrier, which a process that failed would skip,
    leaving the others waiting there."""
    step_dir = self.directory / str(step)
    try:
      state = ocp.StandardCheckpointHandler().restore(
          step_dir / "state", args=ocp.args.StandardRestore(abstract_state))
      metadata = ocp.JsonCheckpointHandler().restore(step_dir / "metadata", args=ocp.args.JsonRestore())
      _check_complete(state, abstract_state, step)
      # Reads are asynchronous; a truncated file may only fail here.
      jax.block_until_ready(state)
      return state, metadata, None
    except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
      return None, None, f"{type(e).__name__}: {_first_line(e)}"

  def _set_aside(self, steps: list[int]):
    """Renames damaged step directories to `<step>.damaged`: kept for inspection, no longer listed
    as checkpoints, and the step number is free for the resumed run's next save."""
    if not steps or not self.repair:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.damaged"
        n = 1
        while dst.exists():
          n += 1
          dst = self.directory / f"{step}.damaged-{n}"
        if src.exists():
          src.rename(dst)
          log.warning("Moved damaged checkpoint %s to %s.", src, dst.name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ztt_jax:checkpointing:set_aside")
    self.manager.reload()

  def _restore_data_iter(self, step, data_iter, metadata) -> bool:
    """Restores the Grain iterator; if its per-process files don't match this run's process count,
    uses the process-independent state kept in the metadata (same global data order)."""
    handler = grain.checkpoint.CheckpointHandler()
    try:
      handler.restore(self.directory / str(step) / "data_iter",
                      args=grain.checkpoint.CheckpointRestore(data_iter))
      return True
    except Exception as e:  # noqa: BLE001
      state = metadata.get("data_iterator_state")
      if state is None:
        raise CheckpointError(
            f"checkpoint step {step}: cannot restore the data iterator ({e}) and the metadata holds "
            "no data_iterator_state. Resume with the original process count.") from e
      log.info("step %d: data iterator restored from the metadata (%s). The state counts global "
               "batches, so the data order is that of the saved run.", step, e)
      data_iter.set_state(state)
      return False


class _DropDiskFull(logging.Filter):
  """Orbax logs a failed async save from its own thread before the error reaches us; the failure is
  then reported once, as the DiskFullError above, not as pages of repeated thread logs."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (is_disk_full(Exception(record.getMessage())) or (exc is not None and is_disk_full(exc)))


_DROP_DISK_FULL = _DropDiskFull()


def _quiet_disk_full_logs() -> None:
  logging.getLogger("absl").addFilter(_DROP_DISK_FULL)  # adding the same filter twice is a no-op


def saved_metadata(directory: str) -> Optional[tuple[int, dict]]:
  """(step, JSON metadata: config, layout, data fingerprint, ...) of the newest finished checkpoint in
  `directory` whose metadata holds a config, or None. Reads only that small file: the resume checks
  run before anything is built."""
  path = epath.Path(directory)
  if not path.is_dir():
    return None
  # Finished checkpoints are bare step numbers; saves in progress carry a suffix.
  steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)
  for step in steps:
    try:
      meta = ocp.JsonCheckpointHandler().restore(path / str(step) / "metadata", args=ocp.args.JsonRestore())
    except Exception:  # noqa: BLE001 - unreadable metadata is damage; restoring reports it
      continue
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
      return step, meta
  return None


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _shapes(tree) -> dict:
  """{'a/b/c': shape} of a params tree (abstract arrays or Orbax ArrayMetadata leaves)."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:400] if text else repr(e)


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


def _split_only_large_arrays(min_bytes: int) -> None:
  """Orbax's StandardSave reads its array handler from a process-wide registry; this one splits a
  replicated array across its replicas only where each slice holds min_bytes
  (checkpoint.replica_parallel_min_bytes)."""
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == min_bytes:
    return
  # Orbax's default handler carries a store of per-array metadata, not public API: keep it.
  store = getattr(current, "_array_metadata_store", None)
  handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=min_bytes,
                                           array_metadata_store=store)
  absl_log = logging.getLogger("absl")  # the override is intended: no "overriding" warning per run
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_log.setLevel(level)
