"""Output swaps that survive kill -9 and a full disk (ztt_jax/outdir.py, under every export).

The swap runs in a child process that SIGKILLs itself at one point of the swap; the parent then
checks that --out is whole (the old output or the new one, never missing or mixed) and that the
next write cleans up what the killed one left.
"""
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from model_testutil import init_params
from ztt_jax import cli, export, outdir
from ztt_jax.errors import DiskFullError
from ztt_jax.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The child: writes {"v": "new"} to --out through outdir.write_atomic and kills itself at `point`.
CHILD = r"""
import os, signal, sys
from ztt_jax import outdir
out, point, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "exchange"
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_exchange, real_rename = outdir._exchange, os.rename
renames = []

def exchange_then(a, b):
  if not exchange:
    return False
  if point == "before_exchange":
    die()
  ok = real_exchange(a, b)
  if point == "after_exchange":
    die()
  return ok

def rename_then(a, b):
  real_rename(a, b)
  renames.append(a)
  if point == "after_aside" and len(renames) == 1 or point == "after_rename_in" and len(renames) == 2:
    die()

def fill(tmp):
  with open(os.path.join(tmp, "v"), "w") as f:
    f.write("new")
  if point == "fill":
    die()

outdir._exchange, outdir.os.rename = exchange_then, rename_then
outdir.write_atomic(out, fill)
"""

POINTS = [("exchange", p) for p in ("fill", "before_exchange", "after_exchange")] + \
         [("rename", p) for p in ("fill", "after_aside", "after_rename_in")]


def _leftovers(parent, base="out"):
  return sorted(p.name for p in pathlib.Path(parent).iterdir() if p.name.startswith(f".{base}."))


def test_the_exchange_is_available_here():
  # Linux has renameat2(RENAME_EXCHANGE); where it works, --out is never missing, even for an instant.
  a, b = pathlib.Path(ROOT / ".pytest_exchange_a"), pathlib.Path(ROOT / ".pytest_exchange_b")
  try:
    a.mkdir(), b.mkdir(), (a / "x").write_text("a"), (b / "x").write_text("b")
    assert outdir._exchange(str(a), str(b)) in (True, False)
    if sys.platform == "linux":
      assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
  finally:
    shutil.rmtree(a, ignore_errors=True), shutil.rmtree(b, ignore_errors=True)


@pytest.mark.parametrize("how,point", POINTS, ids=[f"{h}-{p}" for h, p in POINTS])
def test_kill_9_at_each_point_of_the_swap_leaves_out_whole(tmp_path, how, point, caplog):
  out = tmp_path / "out"
  out.mkdir()
  (out / "v").write_text("old")
  r = subprocess.run([sys.executable, "-c", CHILD, str(out), point, how], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == -signal.SIGKILL, r.stderr
  assert _leftovers(tmp_path), "the killed write left nothing to clean up: it did not die mid-swap"
  if (how, point) == ("rename", "after_aside"):
    # The only moment without RENAME_EXCHANGE when --out is missing: the next look at it restores it.
    assert not out.exists()
    with caplog.at_level(logging.WARNING):
      outdir.recover(str(out))
    assert "restored the previous output" in caplog.text
  new = point in ("after_exchange", "after_rename_in")
  assert (out / "v").read_text() == ("new" if new else "old")
  assert sorted(os.listdir(out)) == ["v"]  # whole: never a mix of the two
  # The next write to that path removes what the killed one left, saying so.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    outdir.write_atomic(str(out), lambda tmp: (pathlib.Path(tmp) / "v").write_text("next"))
  assert (out / "v").read_text() == "next" and _leftovers(tmp_path) == []
  assert "left by an interrupted write" in caplog.text or (how, point) == ("rename", "after_aside")


def test_a_live_writers_temporary_directory_is_left_alone(tmp_path):
  live = tmp_path / f".out.tmp-{os.getpid()}-abc"  # this process is alive: a write in progress
  live.mkdir()
  outdir.write_atomic(str(tmp_path / "out"), lambda tmp: (pathlib.Path(tmp) / "v").write_text("x"))
  assert live.is_dir()


def test_an_export_onto_a_full_disk_is_one_line_and_keeps_the_old_export(small_disk, monkeypatch):
  disk, mounted = small_disk("1m")
  small = ModelConfig(vocab_size=64, d_model=16, num_heads=2, mlp_dim=32, n_middle_layers=1, num_cycles=2,
                      max_seq_len=16).validate()
  big = small.replace(vocab_size=2048, d_model=64, mlp_dim=256)  # ~2 MiB: more than the disk holds
  out = disk / "export"
  export.save(str(out), small, jax.tree.map(np.asarray, init_params(small)[1]))
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  if not mounted:  # no tmpfs here: the file layer's own error, injected where the export writes
    import safetensors.numpy

    def full(*a, **k):
      raise OSError(28, "No space left on device", str(out))
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
  with pytest.raises(DiskFullError) as e:
    export.save(str(out), big, jax.tree.map(np.asarray, init_params(big)[1]), overwrite=True)
  msg = str(e.value)
  assert "\n" not in msg and f"No space left writing {out}" in msg and "MiB free" in msg
  assert f"the previous {out} is unchanged" in msg and "Free some space" in msg
  assert cli.describe(e.value)[1] == cli.EXIT_ERROR
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 64
  assert _leftovers(disk, "export") == []
