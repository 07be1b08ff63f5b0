"""One writer per work directory: the lease (ztt_jax/lease.py) on fabricated holders, and two real
training processes on one directory."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import runs
from ztt_jax import lease as lease_lib
from ztt_jax.errors import LeaseError

ROOT = runs.ROOT
HOST = socket.gethostname()


def _holder(tmp_path, **fields):
  content = {"host": HOST, "pid": os.getpid(), "pid_started": None, "started": time.time(),
             "refreshed": time.time(), **fields}
  (tmp_path / lease_lib.NAME).write_text(json.dumps(content))
  return content


def _exited_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _held_by_me(tmp_path):
  held = json.loads((tmp_path / lease_lib.NAME).read_text())
  return (held["host"], held["pid"]) == (HOST, os.getpid())


def test_a_live_lease_refuses_naming_its_holder_and_is_left_alone(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    for holder in (dict(host="elsewhere", pid=4242),  # another host, refreshed just now
                   dict(pid=sleeper.pid, refreshed=time.time() - 100)):  # this host, pid alive
      content = _holder(tmp_path, **holder)
      with pytest.raises(LeaseError) as e:
        lease_lib.Lease(str(tmp_path), timeout_s=600).acquire()
      message = str(e.value)
      assert f"is being trained by pid {content['pid']} on host {content['host']}" in message
      assert "choose another --workdir" in message and "\n" not in message
      assert json.loads((tmp_path / lease_lib.NAME).read_text()) == content
  finally:
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize("case", ["timed out", "pid exited", "pid reused"])
def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog, case):
  holder, why = {
      "timed out": (dict(host="elsewhere", pid=4242, refreshed=time.time() - 700), "not refreshed for 70"),
      "pid exited": (dict(pid=_exited_pid()), "on this host has exited"),
      "pid reused": (dict(pid=os.getppid(), pid_started=1.0), "on this host is now another process"),
  }[case]
  _holder(tmp_path, **holder)
  held = lease_lib.Lease(str(tmp_path), timeout_s=600)
  with caplog.at_level(logging.WARNING):
    held.acquire()
  assert "Took over the lease" in caplog.text and why in caplog.text
  assert _held_by_me(tmp_path)
  held.release()
  assert not (tmp_path / lease_lib.NAME).exists()


def test_a_run_whose_lease_was_taken_over_stops_at_its_next_refresh(tmp_path):
  held = lease_lib.Lease(str(tmp_path), timeout_s=600)
  held.acquire()
  held.refresh(force=True)
  _holder(tmp_path, host="elsewhere", pid=4242)  # another run decided this one had stalled
  with pytest.raises(LeaseError, match="is now held by pid 4242 on host elsewhere"):
    held.refresh(force=True)
  held.release()  # not ours any more: left in place
  assert json.loads((tmp_path / lease_lib.NAME).read_text())["pid"] == 4242


def _snapshot(d):
  return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_second_train_on_a_live_workdir_refuses_and_the_first_run_is_unharmed(tmp_path):
  workdir = tmp_path / "run"
  with open(tmp_path / "first.err", "w") as err:
    first = subprocess.Popen(runs.train_cmd(workdir, *runs.flags()), cwd=ROOT, env=runs.env(),
                             stdout=subprocess.DEVNULL, stderr=err)
  try:
    runs.wait_for(lambda: (workdir / lease_lib.NAME).exists(), first, what="the first run's lease")
    first.send_signal(signal.SIGSTOP)  # holds the lease, writes nothing while the second one tries
    before = _snapshot(workdir)
    second = subprocess.run(runs.train_cmd(workdir, *runs.flags()), cwd=ROOT, env=runs.env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert f"is being trained by pid {first.pid} on host {HOST}" in last and "Traceback" not in second.stderr
    assert _snapshot(workdir) == before
  finally:
    first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
  assert not (workdir / lease_lib.NAME).exists()  # released at the end
  # The first run is exactly an uninterrupted one.
  assert [r["step"] for r in runs.read_rows(workdir)] == list(range(1, runs.STEPS + 1))
  assert runs.losses(workdir) == runs.losses(runs.reference_run())
  assert runs.steps_on_disk(workdir) == runs.steps_on_disk(runs.reference_run())
