"""Stop requests (SIGTERM, or a preemption notice), seen by every process at the same step, so the
trainer saves that step and exits cleanly."""
from __future__ import annotations

import logging
import signal

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

  `last_step` is the last step asked about; the step running when a signal comes is the next one.
  Use as a context manager: the handler is installed on entry and the previous one put back on exit.
  """

  def __init__(self, last_step: int):
    self.requested = False
    self.last_step = last_step
    self._sync_service = jax.process_count() > 1 and _preemption_service_running()
    self._previous = None

  def __enter__(self) -> StopRequest:
    if not self._sync_service:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    log.warning("SIGTERM received during step %s: will save a checkpoint after it and exit.",
                self.last_step + 1)
    self.requested = True

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
