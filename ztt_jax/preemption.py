"""Stop requests (SIGTERM, Ctrl-C, or a preemption notice), seen by every process at the same step,
so the trainer saves that step and exits cleanly.

Ctrl-C (SIGINT) is a stop request like SIGTERM: the first one lets the running step finish, saves
it, and the run exits 0 with a line saying where it saved and the command that resumes it. A
second Ctrl-C aborts at once (KeyboardInterrupt; the CLI exits 130), for when the save itself is
not wanted or hangs; a save it interrupts is removed as half-written by the next run.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _preemption_service_running() -> bool:
  try:  # no public accessor; absent or renamed means "not running" and the fallback is used
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


class StopRequest:
  """A stop request, seen by every process at the same step.

  With several processes and JAX's preemption service (started by jax.distributed.initialize),
  the service owns SIGTERM: a notice to any host becomes one agreed step on all of them through
  `reached_preemption_sync_point`, with no per-step collective. Installing a Python handler there
  would steal the signal from it. A single process handles SIGTERM itself; several processes
  without the service fall back to a Python handler plus an allgather every step.

  Ctrl-C is always ours (the service listens to SIGTERM only). The first one becomes the same
  request as a SIGTERM: with the service, by sending this process a SIGTERM, so every process still
  stops at the one step the service agrees on; otherwise by setting the flag. The second one raises
  KeyboardInterrupt.

  `last_step` is the last step asked about; the step running when a signal comes is the next one.
  Use as a context manager: the handlers are installed on entry and the previous ones put back on exit.
  """

  def __init__(self, last_step: int):
    self.requested = False
    self.reason: Optional[str] = None  # "SIGTERM" or "SIGINT": what asked for the stop (this process)
    self.last_step = last_step
    self._sync_service = jax.process_count() > 1 and _preemption_service_running()
    self._previous: dict = {}

  def __enter__(self) -> StopRequest:
    if not self._sync_service:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle_term)
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_int)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle_term(self, signum, frame):
    log.warning("SIGTERM received during step %s: will save a checkpoint after it and exit.",
                self.last_step + 1)
    self.requested = True
    self.reason = self.reason or "SIGTERM"

  def _handle_int(self, signum, frame):
    if self.reason == "SIGINT":
      raise KeyboardInterrupt  # the second Ctrl-C: abort now, without the save
    self.reason = "SIGINT"
    log.warning("Ctrl-C (SIGINT) received during step %s: will save a checkpoint after it and exit; "
                "press Ctrl-C again to abort at once without saving.", self.last_step + 1)
    if self._sync_service:
      os.kill(os.getpid(), signal.SIGTERM)  # the service's own notice, agreed on by every process
    else:
      self.requested = True

  def stop_line(self, step: int, checkpoint_dir: str) -> str:
    """What the run prints when it stops after saving `step`: where, and how to resume."""
    what = "Interrupted (Ctrl-C)" if self.reason == "SIGINT" else "Preempted"
    return (f"{what} at step {step}: checkpoint saved in {os.path.join(checkpoint_dir, str(step))}. "
            f"Resume with: {resume_command() or 're-running the same command (same config and workdir)'}")

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    stop = self._agreed(step)
    self.last_step = step
    return stop

  def _agreed(self, step: int) -> bool:
    if self._sync_service:
      stop = multihost_utils.reached_preemption_sync_point(step)
      if stop:
        log.warning("Preemption sync point reached at step %d: saving a checkpoint and exiting.", step)
      return stop
    if jax.process_count() == 1:
      return self.requested
    # Every process must agree, or the ones that stop would leave the others hanging in a collective.
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def resume_command() -> Optional[str]:
  """The command line of this process if it is the train CLI (re-running it resumes), else None."""
  argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
  if os.path.basename(argv0) != "train.py" or os.path.basename(os.path.dirname(argv0)) != "ztt_jax":
    return None
  return shlex.join([sys.executable, "-m", "ztt_jax.train", *sys.argv[1:]])
