"""Launchers and the compile check.

The TPU and SLURM launchers cannot run here; they run against stand-ins for `gcloud` and `srun` that
record how they were called, and the test checks those calls against what a pod or a cluster needs.
"""
import importlib.util
import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

import runs
from ztt_jax import compile_check
from ztt_jax import run as run_lib
from ztt_jax.errors import ConfigError

ROOT = runs.ROOT
LAUNCHERS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))


def test_every_launcher_parses():
  names = {p.name for p in LAUNCHERS}
  assert {"local.sh", "multiprocess.sh", "tpu_pod.sh", "slurm_gpu.sbatch"} <= names
  for path in LAUNCHERS:
    subprocess.run(["bash", "-n", str(path)], check=True)


def _stub(bin_dir: pathlib.Path, name: str, body: str):
  """An executable `name` that appends its argv (one shell-quoted line) to $STUB_LOG, then runs body."""
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n"
                  f'printf "{name}" >> "$STUB_LOG"; printf " %q" "$@" >> "$STUB_LOG"; echo >> "$STUB_LOG"\n'
                  + body + "\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _calls(log: pathlib.Path):
  return [shlex.split(line) for line in log.read_text().splitlines()]


def test_tpu_pod_creates_the_slice_copies_installs_and_runs_on_all_workers(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # `describe` fails: the slice does not exist yet, so the script must create it.
  _stub(bin_dir, "gcloud", 'if [ "$4" = describe ]; then exit 1; fi; exit 0')
  log = tmp_path / "calls.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), TPU_NAME="ztt-pod",
             ZONE="us-central2-b", PROJECT="my-proj", ACCELERATOR_TYPE="v4-32", SPOT="1")
  flags = ["--config=configs/default.py", "--workdir=gs://bucket/runs/a b", "--config.mesh.shape=(4,4,1)"]
  subprocess.run(["bash", "launch/tpu_pod.sh", *flags], cwd=ROOT, env=env, check=True,
                 capture_output=True, text=True)
  calls = [c[1:] for c in _calls(log)]
  assert all(c[:3] == ["compute", "tpus", "tpu-vm"] for c in calls), calls
  verbs = [c[3] for c in calls]
  assert verbs[:3] == ["describe", "create", "scp"] and verbs[3:] == ["ssh"] * 3, verbs
  create = calls[1]
  assert {"ztt-pod", "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
          "--spot"} <= set(create) and any(a.startswith("--version=") for a in create)
  ssh = [c for c in calls if c[3] == "ssh"]
  assert all("--worker=all" in c and "ztt-pod" in c for c in ssh)
  assert "--worker=all" in calls[2] and "ztt-pod:ztt_jax_code.tgz" in calls[2]  # to every worker
  commands = [next(a.split("=", 1)[1] for a in c if a.startswith("--command=")) for c in ssh]
  unpack, install, train = commands
  assert "tar -xzf" in unpack
  assert "-r requirements.txt" in install and "'jax[tpu]==0.10.2'" in install
  # The train flags reach the workers intact, including one with a space.
  assert shlex.split(train.split("&&", 1)[1]) == [".venv/bin/python", "-m", "ztt_jax.train", *flags]


def test_tpu_pod_reuses_a_ready_slice_and_needs_its_name(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "gcloud", 'if [ "$4" = describe ]; then echo READY; fi; exit 0')
  log = tmp_path / "calls.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), TPU_NAME="ztt-pod",
             ZONE="z", SKIP_INSTALL="1")
  subprocess.run(["bash", "launch/tpu_pod.sh", "--config=configs/default.py", "--workdir=gs://b/r"],
                 cwd=ROOT, env=env, check=True, capture_output=True)
  assert [c[4] for c in _calls(log)] == ["describe", "scp", "ssh", "ssh"]
  del env["TPU_NAME"]
  r = subprocess.run(["bash", "launch/tpu_pod.sh", "--workdir=gs://b/r"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode != 0 and "TPU_NAME" in r.stderr


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_script_starts_one_process_per_gpu_or_node_with_srun(tmp_path, per):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "srun", 'echo "ZTT_LOCAL_DEVICE_IDS=${ZTT_LOCAL_DEVICE_IDS:-}" >> "$STUB_LOG"')
  log = tmp_path / "calls.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
             SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
             SLURM_SUBMIT_DIR=str(ROOT), ZTT_PROCESS_PER=per)
  env.pop("ZTT_LOCAL_DEVICE_IDS", None)
  flags = ["--config=configs/default.py", "--workdir=/shared/runs/x"]
  subprocess.run(["bash", "launch/slurm_gpu.sbatch", *flags], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  srun, local_ids = log.read_text().splitlines()
  args = shlex.split(srun)
  assert args[0] == "srun" and "--kill-on-bad-exit=1" in args
  assert f"--ntasks-per-node={4 if per == 'gpu' else 1}" in args
  assert not any(a.startswith("--gpus-per-task") for a in args)  # each task must see all GPUs
  assert args[-len(flags) - 3:] == [".venv/bin/python", "-m", "ztt_jax.train", *flags]
  assert local_ids == ("ZTT_LOCAL_DEVICE_IDS=" if per == "gpu" else "ZTT_LOCAL_DEVICE_IDS=0,1,2,3")
  script = (ROOT / "launch" / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --signal=TERM@" in script  # preemption notice reaches the training processes


def test_multiprocess_launcher_fails_when_its_processes_fail(tmp_path):
  r = subprocess.run(["bash", "launch/multiprocess.sh"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2 and "usage" in r.stderr
  # A mesh the 2 x 1 devices cannot hold: both processes stop with a config error.
  r = subprocess.run(["bash", "launch/multiprocess.sh", "2", "1", "--config=configs/tiny.py",
                      f"--workdir={tmp_path / 'run'}", "--config.mesh.shape=(3,1,1)"],
                     cwd=ROOT, env=runs.env(), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0, r.stdout[-2000:]
  assert "mesh.shape=(3, 1, 1)" in r.stdout and "exited with status" in r.stderr


# --- compile check -------------------------------------------------------------------------------


def _bytes_per_device(tree, devices):
  """Bytes each device holds of a tree of sharded ShapeDtypeStructs, from their shardings alone."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def test_compile_check_reports_the_memory_of_the_real_train_step():
  cfg = runs.config()
  report = compile_check.check(cfg, jax.devices(), topology="cpu:8")
  assert report.ok, report.error
  run = run_lib.build(cfg)
  batch = compile_check.abstract_batch(cfg, run.mesh)
  # Independent count: the step's arguments are the train state and the batch arrays it reads, as
  # sharded (`difficulty` is passed too, but the step never reads it and XLA drops it).
  read = {k: v for k, v in batch.items() if k != "difficulty"}
  want = _bytes_per_device(run.abstract_state, jax.devices()) + _bytes_per_device(read, jax.devices())
  assert report.memory["arguments"] == want
  assert report.memory["aliased"] > 0.9 * _bytes_per_device(run.abstract_state, jax.devices())  # donated
  assert report.memory["temporaries"] > 0 and "OK" in report.text()


def test_compile_check_names_the_parameter_a_mesh_cannot_split():
  report = compile_check.check(runs.config(mesh__shape=(1, 1, 8)), jax.devices(), topology="cpu:8")
  assert not report.ok
  # k/v heads that a mesh cannot split are replicated (GQA); the query and output heads must split
  assert re.search(r"\['attn'\]\['[qo]_kernel'\]", report.error), report.error
  assert "tensor" in report.error and "divide" in report.error
  with pytest.raises(ConfigError, match="is not divisible by --num_hosts=3"):
    compile_check.check(runs.config(), jax.devices(), num_hosts=3)
  tight = compile_check.check(runs.config(), jax.devices(), device_memory_gib=1e-4)
  assert not tight.ok and "exceeds --device_memory_gib" in tight.error


def test_compile_check_tpu_topology_needs_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    with pytest.raises(compile_check.UnsupportedTopology, match="libtpu"):
      compile_check.topology_devices("tpu:v5e:2x2")
  else:  # where libtpu is installed the topology must really be built
    assert len(compile_check.topology_devices("tpu:v5e:2x2")) == 4


def test_compile_check_cli_runs_on_fake_devices_of_the_target_count():
  r = subprocess.run([sys.executable, "-m", "ztt_jax.compile_check", "--topology=cpu:4", *runs.flags()],
                     cwd=ROOT, env=runs.env(8), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  assert "4 devices, mesh {'data': 4" in r.stdout and "per device arguments" in r.stdout
