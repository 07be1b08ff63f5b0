"""Several JAX processes on one machine (launch/multiprocess.sh, coordinator on 127.0.0.1).

Reference for everything here: one process with 8 devices, mesh (8,1,1), never interrupted
(runs.reference_run). The 2-process run uses mesh (2,4,1): data parallel across the processes,
FSDP within each, so its checkpoints are also the "saved on another mesh and process count" input
of the resume tests.
"""
import contextlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import tensorstore as ts

import runs
from ztt_jax import trainer

ROOT = runs.ROOT
MESH = (2, 4, 1)
KILL_AFTER = 8  # SIGKILL both processes once this checkpoint is on disk
RTOL = 1e-4     # another mesh and process count: same math, another reduction order


def _launch(workdir, logdir):
  # The params are replicated across the two processes (data axis), so only Orbax's replica-parallel
  # save lets the second process write any of them; the tiny arrays need a threshold below 1 MiB.
  cmd = ["bash", "launch/multiprocess.sh", "2", "4", f"--workdir={workdir}",
         *runs.flags(mesh__shape=MESH, checkpoint__replica_parallel_min_bytes=1024)]
  # A survivor blocked in a collective is SIGKILLed this long after the launcher's SIGTERM.
  env = dict(runs.env(), ZTT_LOG_DIR=str(logdir), ZTT_KILL_GRACE="5")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """2 processes x 4 devices: one of them killed (SIGKILL) after checkpoint KILL_AFTER, as a pod
  loses a host; the survivor must stop by itself. Then the same command is run again."""
  root = tmp_path_factory.mktemp("multihost")
  workdir = root / "run"
  proc = _launch(workdir, root / "logs_first")
  try:
    runs.wait_for(lambda: (workdir / "checkpoints" / str(KILL_AFTER)).is_dir(), proc, timeout=400,
                  what=f"checkpoint {KILL_AFTER}")
    victim = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                  if "--process_id=1" in c.cmdline())
    victim.kill()
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    survivor_exit_s = time.monotonic() - t0
  finally:
    with contextlib.suppress(ProcessLookupError):  # usually all gone already
      os.killpg(proc.pid, signal.SIGKILL)  # anything left, should the assertions below fail
    proc.wait()
  first = {
      "metrics_rows": runs.read_rows(workdir),
      "checkpoints": runs.steps_on_disk(workdir),
      "process_1_log": (root / "logs_first" / "process_1.log").read_text(),
      "launcher": (proc.returncode, err, survivor_exit_s, victim.pid),
  }
  proc = _launch(workdir, root / "logs_second")
  _, err = proc.communicate(timeout=400)
  assert proc.returncode == 0, err[-3000:] + (root / "logs_second" / "process_0.log").read_text()[-3000:]
  return workdir, root, first


def test_losing_one_process_stops_the_other_within_a_minute_naming_it(two_process_run):
  _, _, first = two_process_run
  rc, err, seconds, victim = first["launcher"]
  assert seconds < 60 and rc != 0, (seconds, rc, err)
  assert f"process 1 (pid {victim}) exited with status 137; stopping the others" in err, err


def test_two_processes_equal_one_process_and_resume_after_one_is_killed(two_process_run):
  workdir, root, first = two_process_run
  reference = runs.losses(runs.reference_run())

  killed_at = max(r["step"] for r in first["metrics_rows"])
  resumed_from = max(first["checkpoints"])
  assert KILL_AFTER <= resumed_from <= killed_at < runs.STEPS, (first["checkpoints"], killed_at)
  # Metrics come from process 0 alone: before the kill, one row per step.
  steps_logged = [r["step"] for r in first["metrics_rows"]]
  assert steps_logged == list(range(1, killed_at + 1))
  assert "step 1/" not in first["process_1_log"]  # and so does the progress log

  log_second = (root / "logs_second" / "process_0.log").read_text()
  assert f"Resumed from checkpoint step {resumed_from}" in log_second
  got = runs.losses(workdir)
  assert sorted(got) == list(range(1, runs.STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(got)],
                             rtol=RTOL, err_msg="2 processes x 4 devices vs 1 process x 8 devices")


def test_each_checkpoint_is_written_once_by_the_two_processes(two_process_run):
  workdir, _, _ = two_process_run
  ckpt = workdir / "checkpoints"
  assert runs.steps_on_disk(workdir) == [8, 12, 16]  # max_to_keep=3, nothing half-written left
  assert sorted(p.name for p in ckpt.iterdir()) == ["12", "16", "8"]
  for step in (8, 12, 16):
    d = ckpt / str(step)
    # One iterator file per process, one metadata file, one state.
    assert sorted(p.name for p in (d / "data_iter").glob("*.json")) == ["process_0-of-2.json",
                                                                       "process_1-of-2.json"]
    meta = json.loads((d / "metadata" / "metadata").read_text())
    assert meta["process_count"] == 2 and meta["mesh"]["shape"] == list(MESH)
    # Each process wrote its own chunks of the arrays into its own OCDBT database, and no chunk
    # was written twice: the databases are disjoint and together make up the merged checkpoint.
    state = d / "state"
    written = {p: _ocdbt_keys(state / f"ocdbt.process_{p}") for p in (0, 1)}
    assert written[0] and written[1], "one process wrote nothing"
    assert not written[0] & written[1], sorted(written[0] & written[1])[:5]
    assert written[0] | written[1] == _ocdbt_keys(state)


def _ocdbt_keys(path):
  kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}"}).result()
  return {k.decode() for k in kvstore.list().result()}


def test_resume_on_another_mesh_and_on_fewer_devices(two_process_run, tmp_path):
  """The (2,4,1) checkpoint of 2 processes resumes on 1 process with mesh (8,1,1), and with 4 devices
  instead of 8. The data iterator resumes too: the following losses equal the uninterrupted run."""
  workdir, _, _ = two_process_run
  reference = runs.losses(runs.reference_run())
  resume_from = 8
  for name, devices in [("mesh_8x1x1", 8), ("devices_4", 4)]:
    copy = runs.copy_run(workdir, tmp_path / name, keep_up_to=resume_from)
    (copy / "metrics.jsonl").unlink()
    if devices == 8:
      trainer.train(runs.config(), str(copy))  # mesh (-1,1,1) -> (8,1,1)
    else:
      r = subprocess.run(runs.train_cmd(copy, *runs.flags()), cwd=ROOT, env=runs.env(devices),
                         capture_output=True, text=True, timeout=300)
      assert r.returncode == 0, r.stderr[-3000:]
      assert "data iterator restored from the metadata" in r.stderr
    got = runs.losses(copy)
    assert sorted(got) == list(range(resume_from + 1, runs.STEPS + 1)), name
    meta = json.loads((copy / "checkpoints" / "16" / "metadata" / "metadata").read_text())
    assert meta["mesh"]["shape"] == [devices, 1, 1] and meta["process_count"] == 1
    np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(got)],
                               rtol=RTOL, err_msg=name)
