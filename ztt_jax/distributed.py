"""Joining JAX's multi-controller runtime (`jax.distributed`) when launched as one of many processes."""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)

# Environments where `jax.distributed.initialize()` with no arguments finds the cluster itself.
_AUTO_DETECT_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                    "OMPI_COMM_WORLD_SIZE")


def maybe_initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> bool:
  """Initialises jax.distributed if this is a multi-process launch; returns whether it did.

  Explicit values win, then ZTT_COORDINATOR_ADDRESS / ZTT_NUM_PROCESSES / ZTT_PROCESS_ID, then the
  cluster's own auto-detection (Cloud TPU VMs, SLURM, Open MPI). A plain single-process run does
  nothing.
  """
  coordinator_address = coordinator_address or os.environ.get("ZTT_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("ZTT_NUM_PROCESSES"):
    num_processes = int(os.environ["ZTT_NUM_PROCESSES"])
  if process_id is None and os.environ.get("ZTT_PROCESS_ID"):
    process_id = int(os.environ["ZTT_PROCESS_ID"])

  if coordinator_address or (num_processes and num_processes > 1):
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError(
          "A multi-process launch needs all three of --coordinator_address, --num_processes and "
          "--process_id (or ZTT_COORDINATOR_ADDRESS, ZTT_NUM_PROCESSES, ZTT_PROCESS_ID); got "
          f"{coordinator_address!r}, {num_processes!r}, {process_id!r}.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif any(v in os.environ for v in _AUTO_DETECT_ENV) and os.environ.get("ZTT_NO_AUTO_DISTRIBUTED") != "1":
    jax.distributed.initialize()
  else:
    return False
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
