"""Joining JAX's multi-controller runtime (`jax.distributed`) when launched as one of many processes,
and keeping those processes in step while each compiles (`compile_synced`).

Call `maybe_initialize` before anything touches a JAX device: the process count and the global
device list are fixed when the backend starts.
"""
from __future__ import annotations

import glob
import importlib.util
import itertools
import logging
import os
import time
from typing import Optional

import jax

log = logging.getLogger(__name__)


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def detected_cluster() -> Optional[str]:
  """The cluster whose environment `jax.distributed.initialize()` can read by itself, if any.

  Mirrors JAX's own detectors (jax/_src/clusters), but only reports clusters with more than one
  process, so a single task inside a SLURM allocation or a one-host TPU VM runs exactly as on a
  laptop. ZTT_NO_AUTO_DISTRIBUTED=1 turns detection off.
  """
  if os.environ.get("ZTT_NO_AUTO_DISTRIBUTED") == "1":
    return None
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  # SLURM_STEP_NODELIST exists only inside an `srun` step: a plain `python` in an salloc shell is
  # one process, and initialising there would wait forever for tasks that never start.
  if all(v in os.environ for v in slurm_vars) and _int_env("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  # GKE / multislice set these; a GCE TPU VM pod is found through its metadata server instead.
  if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu"  # a Cloud TPU VM; on a one-host slice initialize() finds a single process
  return None


def maybe_initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, heartbeat_timeout_s: Optional[int] = None) -> bool:
  """Initialises jax.distributed if this is a multi-process launch; returns whether it did.

  Explicit values win, then ZTT_COORDINATOR_ADDRESS / ZTT_NUM_PROCESSES / ZTT_PROCESS_ID, then the
  cluster's own auto-detection (Cloud TPU VMs, SLURM `srun`, Open MPI `mpirun`). A plain
  single-process run does nothing. ZTT_LOCAL_DEVICE_IDS (comma-separated) picks this process's
  accelerators.
  """
  coordinator_address = coordinator_address or os.environ.get("ZTT_COORDINATOR_ADDRESS")
  # JAX's SLURM/MPI detection gives each process one GPU (index = local rank); a process that drives
  # all GPUs of its node lists them here, e.g. ZTT_LOCAL_DEVICE_IDS=0,1,2,3 (launch/slurm_gpu.sbatch).
  local_ids = os.environ.get("ZTT_LOCAL_DEVICE_IDS")
  local_device_ids = [int(i) for i in local_ids.split(",")] if local_ids else None
  if num_processes is None and os.environ.get("ZTT_NUM_PROCESSES"):
    num_processes = int(os.environ["ZTT_NUM_PROCESSES"])
  if process_id is None and os.environ.get("ZTT_PROCESS_ID"):
    process_id = int(os.environ["ZTT_PROCESS_ID"])

  if coordinator_address or num_processes is not None or process_id is not None:
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError(
          "A multi-process launch needs all three of --coordinator_address, --num_processes and "
          "--process_id (or ZTT_COORDINATOR_ADDRESS, ZTT_NUM_PROCESSES, ZTT_PROCESS_ID); got "
          f"{coordinator_address!r}, {num_processes!r}, {process_id!r}.")
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator address {coordinator_address!r} needs a port: host:port, e.g. "
                       "10.0.0.2:1234 (the same on every process; process 0 listens on it).")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               **_timeouts(heartbeat_timeout_s))
  else:
    cluster = detected_cluster()
    if cluster is None:
      return False
    log.info("Detected a %s cluster: jax.distributed.initialize() reads it from the environment.",
             cluster)
    jax.distributed.initialize(local_device_ids=local_device_ids, **_timeouts(heartbeat_timeout_s))
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# ------------------------------------------------------------------ compiling on several processes

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
  # jax.distributed has no public barrier; its client (jax._src) does, with no 30 s limit.
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, timeout_s * 1000)



# ------------------------------------------------------------------ losing a process

# What a survivor exits with when a peer is gone: EX_TEMPFAIL, "try again". A pod or SLURM job
# re-queues on it, and the restart resumes from the last checkpoint (docs/checkpoints-and-faults.md).
EXIT_PEER_LOST = 75
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


def _timeouts(heartbeat_timeout_s: Optional[int]) -> dict:
  """JAX waits 100 s for a heartbeat and 300 s at shutdown by default: a pod whose host died would
  idle for minutes in a collective that never completes. A lost peer is declared after this many
  seconds (flag --heartbeat_timeout_s, or ZTT_HEARTBEAT_TIMEOUT_S for cluster-detected launches)."""
  hb = heartbeat_timeout_s or _int_env("ZTT_HEARTBEAT_TIMEOUT_S") or DEFAULT_HEARTBEAT_TIMEOUT_S
  return {"heartbeat_timeout_seconds": hb, "shutdown_timeout_seconds": hb}


def lost_processes() -> Optional[list[int]]:
  """The processes the coordination service no longer sees alive; None when it cannot be asked
  (a single process, or the coordinator itself is gone: then process 0 is lost)."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return None
  everyone = list(range(jax.process_count()))
  try:
    live = set(client.get_live_nodes(everyone))
  except Exception:  # noqa: BLE001 - the service is unreachable: it lived in process 0
    return [0] if jax.process_index() != 0 else None
  return [p for p in everyone if p not in live]


def peer_lost(error: BaseException, heartbeat_timeout_s: Optional[int] = None) -> Optional[str]:
  """After `error` in a multi-process run: the one line to exit with if a peer is gone, else None.

  A collective with a dead peer fails at once on CPU (Gloo: connection reset) but the coordination
  service declares the peer lost only after the heartbeat timeout; so wait up to that long for it."""
  if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
    return None  # a config or data error is this process's own, and is reported as such
  deadline = time.monotonic() + _timeouts(heartbeat_timeout_s)["heartbeat_timeout_seconds"] + 5
  lost = lost_processes()
  while lost == [] and time.monotonic() < deadline:
    time.sleep(1)
    lost = lost_processes()
  if not lost:
    return None
  names = ", ".join(map(str, lost))
  return (f"PeerLost: process {names} of {jax.process_count()} is gone (this is process {jax.process_index()}; "
          f"it stopped at: {type(error).__name__}). Restart the job (re-queue it): every process resumes from "
          f"the last checkpoint. Exit status {EXIT_PEER_LOST}.")
