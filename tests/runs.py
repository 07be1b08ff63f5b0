"""Shared runs for the multi-host and fault tests.

Every run here uses the same tiny config and the same number of steps, so the train step compiles
to the same program in this process and in the subprocesses (which inherit the persistent
compilation cache from conftest). The uninterrupted single-process run is computed once per session
and is the reference the others are compared with.
"""
import atexit
import functools
import json
import os
import pathlib
import shutil
import struct
import sys
import tempfile
import time

import jax

from ztt_jax import config as config_lib
from ztt_jax import trainer
from ztt_jax.metrics import read_metrics
from test_config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 16
EVERY = 4
# eval.max_batches=0: no evaluation, so no eval program is compiled; these tests are about training
# state, not accuracy.
BASE = {"train.steps": STEPS, "checkpoint.every_steps": EVERY, "eval.max_batches": 0,
        "log.every_steps": 1, "log.tensorboard": False}


def config(**overrides):
  """tiny + BASE + overrides (keys like 'mesh.shape' given as mesh__shape)."""
  cd = load_config("tiny")
  for dotted, value in {**BASE, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
    section, field = dotted.split(".")
    cd[section][field] = value
  return config_lib.parse(cd)


def flags(**overrides):
  """The same settings as `config(**overrides)`, as train CLI flags."""
  out = ["--config=configs/tiny.py"]
  for dotted, value in {**BASE, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ")"
    out.append(f"--config.{dotted}={value}")
  return out


def env(devices=8, optimized=False):
  """The environment of a training subprocess on `devices` fake CPU devices, with the suite's other
  XLA flags (conftest.py); `optimized`: without the suite's -O0, for a test whose time is running
  many steps rather than compiling them."""
  drop = set(os.environ.get("ZTT_TEST_XLA_FLAGS", "").split()) if optimized else set()
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if f not in drop and not f.startswith("--xla_force_host_platform_device_count=")]
  return dict(os.environ, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
              JAX_PLATFORMS="cpu")


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "ztt_jax.train", f"--workdir={workdir}", *extra]


def losses(workdir):
  by_step = {}
  for row in read_metrics(workdir):  # a resumed run re-logs steps: the last value wins
    if "train/loss" in row:
      by_step[row["step"]] = row["train/loss"]
  return by_step


def read_rows(workdir):
  """metrics.jsonl rows; tolerates the line a running process is writing."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  rows = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def steps_on_disk(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def wait_for(predicate, proc, timeout=240, what="condition"):
  deadline = time.time() + timeout
  while not predicate():
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process exited with {proc.returncode} before {what}")
    if time.time() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


@functools.lru_cache(maxsize=None)
def reference_run() -> pathlib.Path:
  """One process, 8 devices, mesh (8,1,1), never interrupted: its work directory."""
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="ztt_reference_"))
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  trainer.train(config(), str(workdir), devices=jax.devices())
  return workdir


def copy_run(src, dst, keep_up_to=None):
  """A copy of a work directory, optionally without the checkpoints after `keep_up_to`."""
  shutil.copytree(src, dst)
  if keep_up_to is not None:
    for step in steps_on_disk(dst):
      if step > keep_up_to:
        shutil.rmtree(pathlib.Path(dst) / "checkpoints" / str(step))
  return pathlib.Path(dst)


def tensorboard_scalars(event_files, tag):
  """{step: value} of `tag` as TensorBoard shows it, from the bytes of each event file in the order
  they were written (TFRecord framing: length, its CRC, the Event proto, its CRC). TensorBoard's rule
  for a restarted run: a SessionLog START at step s hides every earlier event at a step >= s."""
  from tensorboardX.proto import event_pb2
  shown = {}
  for data in event_files:
    i = 0
    while i < len(data):
      n = struct.unpack("<Q", data[i:i + 8])[0]
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {s: v for s, v in shown.items() if s < event.step}
      for value in event.summary.value:
        if value.tag == tag:
          shown[event.step] = value.simple_value
  return shown
