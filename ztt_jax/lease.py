"""One writer per work directory: process 0 of a training run holds WORKDIR/lease.json.

The lease names its holder (host, pid, the pid's start time, when it started and when it last
refreshed). `train` takes it before anything is compiled or repaired, refreshes it as it trains and
removes it when it ends. A second run on the same directory finds it and stops, unless the lease is
stale: its pid is gone (or is another process now) on this host, or it has not been refreshed for
`checkpoint.lease_timeout_s` (the only test possible for a holder on another host). Readers
(evaluate, generate, export) never look at it.

Taking the lease is create-if-absent (ztt_jax.storage.create_new): locally the full file is written
under a temporary name and hard-linked to lease.json, which fails if lease.json exists (atomic on
local and NFS file systems); on an object store (a gs:// workdir) it is an upload with the
precondition that no lease.json exists (GCS ifGenerationMatch=0). Either way a reader never sees a
half-written lease. Taking over a stale lease: locally it is renamed aside first, and a taker that
finds it renamed someone else's fresh lease puts it back and stops; on GCS it is deleted only if it
is still the generation that was read and judged stale, so of two takers one wins.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Optional

import psutil

from ztt_jax import storage
from ztt_jax.errors import LeaseError

log = logging.getLogger(__name__)

NAME = "lease.json"


def _pid_started(pid: int) -> Optional[float]:
  """When `pid` started (None: no such process): with the pid, names one process even after the
  pid is reused."""
  try:
    return psutil.Process(pid).create_time()
  except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
    return None


def _utc(t: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _read(path: str) -> Optional[dict]:
  """The lease at `path`; None if there is none; {} if it cannot be read as one."""
  try:
    holder = json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) and {"host", "pid", "refreshed"} <= set(holder) else {}


def _write_new(path: str, content: dict) -> bool:
  """Creates `path` holding `content` if it does not exist; False if it does."""
  return storage.create_new(path, json.dumps(content).encode())


class Lease:
  """The lease of `workdir` while this process holds it (see the module docstring)."""

  def __init__(self, workdir: str, timeout_s: float):
    self.workdir, self.timeout_s = workdir, timeout_s
    self.path = storage.join(workdir, NAME)
    now, pid = time.time(), os.getpid()
    self.me = {"host": socket.gethostname(), "pid": pid, "pid_started": _pid_started(pid),
               "started": now, "refreshed": now}
    self._last_write = now

  def _is_mine(self, holder: Optional[dict]) -> bool:
    return bool(holder) and all(holder.get(k) == self.me[k] for k in ("host", "pid", "pid_started"))

  def stale_reason(self, holder: dict) -> Optional[str]:
    """Why `holder`'s lease may be taken over; None while its run may still be writing."""
    age = time.time() - holder["refreshed"]
    if holder["host"] == self.me["host"]:
      started = _pid_started(holder["pid"])
      if started is None:
        return f"pid {holder['pid']} on this host has exited"
      if holder.get("pid_started") is not None and abs(started - holder["pid_started"]) > 1:
        return f"pid {holder['pid']} on this host is now another process"
    if age > self.timeout_s:
      return f"not refreshed for {age:.0f} s > checkpoint.lease_timeout_s={self.timeout_s:g}"
    return None

  def acquire(self) -> None:
    """Takes the lease, taking over a stale one with a warning; LeaseError while another run holds it."""
    for _ in range(3):  # a lease can vanish (its run ended) or appear (another taker) between the steps
      if _write_new(self.path, self.me):
        return
      holder = _read(self.path)
      if holder is None:
        continue
      if self._is_mine(holder):  # this process took it before and never let go (train() raised)
        self.refresh(force=True)
        return
      if not holder:
        raise LeaseError(f"{self.path} exists but is not a lease ztt_jax can read; if no run is training in "
                         f"{self.workdir}, delete it and rerun.")
      why = self.stale_reason(holder)
      if why is None:
        raise LeaseError(
            f"{self.workdir} is being trained by pid {holder['pid']} on host {holder['host']} "
            f"(since {_utc(holder.get('started', holder['refreshed']))}, lease refreshed "
            f"{time.time() - holder['refreshed']:.0f} s ago); wait for that run to end or stop it, or "
            "choose another --workdir.")
      self._take_over(holder, why)
    raise LeaseError(f"{self.path} keeps changing: other runs are starting in the same directory; start one.")

  def _take_over(self, holder: dict, why: str) -> None:
    if storage.is_url(self.path):
      self._take_over_object(holder, why)
      return
    aside = f"{self.path}.stale-{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another taker moved it first; acquire() tries again
    taken = _read(aside)
    if taken != holder:  # it was replaced by a fresh lease after we read it: that run holds the directory
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.remove(aside)
      return
    os.remove(aside)
    self._warn_taken(holder, why)

  def _take_over_object(self, holder: dict, why: str) -> None:
    # No rename on an object store: delete the lease only if it is still the one judged stale (the
    # generation read before its content); acquire() then creates ours if absent.
    gen = storage.generation(self.path)
    if gen is None or _read(self.path) != holder:
      return  # gone or replaced since: acquire() looks again
    if storage.delete(self.path, if_generation=gen):
      self._warn_taken(holder, why)

  def _warn_taken(self, holder: dict, why: str) -> None:
    log.warning("Took over the lease of %s from pid %d on host %s (%s): that run is no longer writing.",
                self.workdir, holder["pid"], holder["host"], why)

  def refresh(self, force: bool = False) -> None:
    """Rewrites the lease with the current time, at most every few seconds unless `force`;
    LeaseError if another run has taken it over (this one stalled past the timeout)."""
    now = time.time()
    if not force and now - self._last_write < min(10.0, self.timeout_s / 10):
      return
    holder = _read(self.path)
    if not self._is_mine(holder):
      who = f"pid {holder['pid']} on host {holder['host']}" if holder else "no readable lease (it was deleted or replaced)"
      raise LeaseError(f"The lease of {self.workdir} is now held by {who}: this run went "
                       f"{now - self._last_write:.0f} s without refreshing it (checkpoint.lease_timeout_s="
                       f"{self.timeout_s:g}); it stops so that one run writes there. Raise the timeout.")
    storage.write_text(self.path, json.dumps({**self.me, "refreshed": now}))
    self._last_write = now

  def release(self) -> None:
    if self._is_mine(_read(self.path)):
      storage.delete(self.path)
