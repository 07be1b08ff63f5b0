"""Every test runs on 8 fake CPU devices; the flag must be set before jax is imported."""
import os

# The suite's time is XLA:CPU compiling tiny programs, not running them: LLVM at -O0 compiles the
# train step in about 60% of the time (the same IEEE arithmetic; no fast-math either way).
# ZTT_TEST_XLA_FLAGS="" runs the suite with XLA's optimising backend, as the framework runs.
TEST_XLA_FLAGS = os.environ.setdefault("ZTT_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile

# Tests compile the same small programs many times, in this process and in the training
# subprocesses they start (which inherit the environment). JAX's persistent compilation cache,
# fresh for each session, makes each distinct program compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ztt_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The MFU peak is measured once per machine and cached in the user's home; a test run on busy cores
# must not write its (low) figure there. One file per session, shared by its subprocesses.
os.environ.setdefault("ZTT_JAX_PEAK_FLOPS_CACHE", os.path.join(tempfile.mkdtemp(prefix="ztt_jax_peak_"), "peak_flops.json"))

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


import subprocess

import pytest


@pytest.fixture
def small_disk(tmp_path):
  """small_disk(size) -> (folder, mounted): a tmpfs of `size` (e.g. "16m") where this machine lets
  the tests mount one, so the disk really fills up; else a plain folder and False, and the test
  injects the error the file layer raises on a full disk. Unmounted afterwards."""
  mounts = []

  def make(size):
    disk = tmp_path / f"disk{len(mounts)}"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if mounted:
      mounts.append(disk)
    return disk, mounted

  yield make
  for disk in mounts:
    subprocess.run(["umount", "-l", str(disk)], check=False)


# pytest-xdist (--dist loadfile) hands out whole files in collection order, a few per worker at
# first and then one per free worker. The files that start real training processes go first, so the
# run does not end with one worker alone on a long file while the other idles (longest first).
LONGEST_FIRST = ("test_multihost.py", "test_training.py", "test_recipes.py", "test_faults.py", "test_safety.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
