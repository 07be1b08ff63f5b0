"""Faults: preemption (SIGTERM), damaged or half-written checkpoints, non-finite losses, a full disk.

Reference: the uninterrupted single-process run of the same config (runs.reference_run). Runs here
share its compiled step, so a resumed run must reproduce its losses exactly.
"""
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import runs
from ztt_jax import cli
from ztt_jax import data as data_lib
from ztt_jax import run as run_lib
from ztt_jax import trainer
from ztt_jax.checkpointing import Checkpointer
from ztt_jax.errors import CheckpointError, DiskFullError

ROOT = runs.ROOT
# After a read of a damaged file fails, TensorStore's pending callbacks reach Orbax's already-closed
# asyncio loop; Python reports that from a background thread. It is noise, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _restore(workdir, cfg, step=None, **ckpt_overrides):
  run = run_lib.build(cfg)
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size,
                                    vocab_size=cfg.model.vocab_size)
  ckpt = Checkpointer(str(workdir / "checkpoints"), dataclasses.replace(cfg.checkpoint, **ckpt_overrides),
                      repair=True)
  try:
    return ckpt.restore(run.abstract_state, it, step=step)
  finally:
    ckpt.close()


def _truncate_arrays(step_dir):
  """Cuts every array data file of the checkpoint's state in half (OCDBT keeps them under d/)."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  assert files
  for f in files:
    os.truncate(f, f.stat().st_size // 2)


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_resumes_from_it(tmp_path):
  workdir = tmp_path / "run"
  every = {"checkpoint__every_steps": 1000}  # the only checkpoint will be the one SIGTERM asks for
  err_path = tmp_path / "stderr.txt"
  with open(err_path, "w") as err:
    proc = subprocess.Popen(runs.train_cmd(workdir, *runs.flags(**every)), cwd=ROOT, env=runs.env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    runs.wait_for(lambda: len(runs.read_rows(workdir)) >= 2, proc, what="step 2")
    logged_before_signal = max(r["step"] for r in runs.read_rows(workdir))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
  match = re.search(r"SIGTERM received during step (\d+)", err_path.read_text())
  assert match, err_path.read_text()[-3000:]
  signal_step = int(match.group(1))
  assert logged_before_signal <= signal_step < runs.STEPS
  # The checkpoint is of the step that was running when the signal came, and training stopped there.
  assert runs.steps_on_disk(workdir) == [signal_step]
  assert max(r["step"] for r in runs.read_rows(workdir)) == signal_step

  trainer.train(runs.config(**every), str(workdir))  # re-run: resumes from signal_step
  assert [r["step"] for r in runs.read_rows(workdir)] == list(range(1, runs.STEPS + 1))
  reference, got = runs.losses(runs.reference_run()), runs.losses(workdir)
  assert [got[s] for s in range(1, runs.STEPS + 1)] == [reference[s] for s in range(1, runs.STEPS + 1)]


def test_damaged_newest_checkpoint_and_half_written_save_fall_back_to_the_previous_one(tmp_path, caplog):
  workdir = runs.copy_run(runs.reference_run(), tmp_path / "run")  # checkpoints 8, 12, 16
  (workdir / "metrics.jsonl").unlink()
  ckpt = workdir / "checkpoints"
  # The save of step 16 was killed half-way: only its temporary directory exists, incomplete.
  (ckpt / "16").rename(ckpt / "16.orbax-checkpoint-tmp")
  shutil.rmtree(ckpt / "16.orbax-checkpoint-tmp" / "state" / "d")
  # And the newest complete checkpoint, 12, has truncated array files.
  _truncate_arrays(ckpt / "12")

  with caplog.at_level(logging.WARNING):
    trainer.train(runs.config(), str(workdir))
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert re.search(r"checkpoint step 12 in \S+ is damaged or unreadable", warnings), warnings
  assert "16.orbax-checkpoint-tmp: a checkpoint save that never finished" in warnings
  assert "Moved damaged checkpoint" in warnings

  # Resumed from 8, the newest good one, with the right data: the losses are the uninterrupted run's.
  reference, got = runs.losses(runs.reference_run()), runs.losses(workdir)
  assert sorted(got) == list(range(9, runs.STEPS + 1))
  assert [got[s] for s in sorted(got)] == [reference[s] for s in sorted(got)]
  # Step 12 was saved again; the damaged one is kept aside; no temporary directory is left.
  assert sorted(p.name for p in ckpt.iterdir()) == ["12", "12.damaged", "16", "8"]


def test_deleted_array_file_falls_back_and_all_damaged_stops_unless_fresh_start_allowed(tmp_path, caplog):
  workdir = runs.copy_run(runs.reference_run(), tmp_path / "run")
  cfg = runs.config()
  data_files = [f for f in (workdir / "checkpoints" / "16" / "state").rglob("*")
                if f.is_file() and f.parent.name == "d"]
  max(data_files, key=lambda f: f.stat().st_size).unlink()
  with caplog.at_level(logging.WARNING):
    restored = _restore(workdir, cfg)
  assert restored.step == 12
  assert re.search(r"checkpoint step 16 in \S+ is damaged", caplog.text), caplog.text

  for step in (8, 12):
    _truncate_arrays(workdir / "checkpoints" / str(step))
  with pytest.raises(CheckpointError) as e:
    _restore(workdir, cfg)
  message = str(e.value)
  assert "steps [8, 12]" in message and "allow_fresh_start=True" in message
  assert "checkpoint step 12" in message and "checkpoint step 8" in message
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert _restore(workdir, cfg, allow_fresh_start=True) is None
  assert "starting fresh because checkpoint.allow_fresh_start=True" in caplog.text


def _params_finite(workdir, cfg, step):
  params = jax.device_get(_restore(workdir, cfg, step=step).state.params)
  return all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params)), params


def test_nonfinite_raise_stops_naming_the_step_and_never_saves_nonfinite_params(tmp_path):
  cfg = runs.config(train__learning_rate=1e30, checkpoint__every_steps=1)  # diverges in a few steps
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train(cfg, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  assert 1 < bad_step < runs.STEPS
  saved = runs.steps_on_disk(tmp_path)
  assert saved and max(saved) == bad_step - 1  # every step before it was saved, it was not
  for step in saved:
    assert _params_finite(tmp_path, cfg, step)[0], step


def test_nonfinite_skip_drops_the_updates_and_counts_them(tmp_path):
  cfg = runs.config(train__learning_rate=1e30, train__nonfinite="skip")
  trainer.train(cfg, str(tmp_path))
  rows = runs.read_rows(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))
  # Independent count: the logged gradient norms that are not finite (NaN is logged as null).
  bad = [r["step"] for r in rows if r["train/grad_norm"] is None or abs(r["train/grad_norm"]) >= 1e308
         or r["train/loss"] is None]
  assert bad, "the learning rate did not make the run diverge"
  assert bad == list(range(bad[0], runs.STEPS + 1))  # params stuck where every gradient overflows
  assert [r["train/skipped_steps"] for r in rows] == [sum(b <= r["step"] for b in bad) for r in rows]
  # The dropped updates left the params where they were, finite.
  saved = runs.steps_on_disk(tmp_path)
  assert saved == [8, 12, 16] and min(bad) <= 12
  finite_12, params_12 = _params_finite(tmp_path, cfg, 12)
  finite_16, params_16 = _params_finite(tmp_path, cfg, 16)
  assert finite_12 and finite_16
  jax.tree.map(np.testing.assert_array_equal, params_12, params_16)


def test_resume_after_a_crash_leaves_one_history_in_metrics_and_tensorboard(tmp_path):
  # A run killed at step 16 whose last finished checkpoint is 8: it logged steps 9..16 (and half
  # of 17's line) that the resumed run trains again.
  workdir = runs.copy_run(runs.reference_run(), tmp_path / "run", keep_up_to=8)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 17, "train/lo')
  from tensorboardX import SummaryWriter
  with SummaryWriter(str(workdir / "tensorboard"), filename_suffix=".crashed") as tb:
    for step in range(1, 17):
      tb.add_scalar("train/loss", 100.0 + step, step)
  time.sleep(1.1)  # event files are named by the second they were opened: keep them in order

  trainer.train(runs.config(log__tensorboard=True), str(workdir))
  steps = [r["step"] for r in runs.read_rows(workdir)]
  assert steps == list(range(1, runs.STEPS + 1))  # each step once: the crashed run's 9..16 are gone
  reference, got = runs.losses(runs.reference_run()), runs.losses(workdir)
  assert got == reference
  logdir = workdir / "tensorboard"
  shown = runs.tensorboard_scalars([p.read_bytes() for p in sorted(logdir.iterdir()) if ".tfevents." in p.name],
                                   "train/loss")
  assert sorted(shown) == list(range(1, runs.STEPS + 1))
  assert [shown[s] for s in range(1, 9)] == [100.0 + s for s in range(1, 9)]  # before the checkpoint
  np.testing.assert_allclose([shown[s] for s in range(9, 17)], [reference[s] for s in range(9, 17)],
                             rtol=1e-6)  # TensorBoard stores float32


# ------------------------------------------------------------------ a full disk

def _fill(disk, leave_bytes):
  """Fills the tmpfs up to `leave_bytes` of free space; returns the filler file."""
  filler = disk / "filler"
  with open(filler, "wb") as f:
    f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave_bytes))
  return filler


_ORBAX_DISK_FULL = ("RESOURCE_EXHAUSTED: Error writing \"params\" in OCDBT database: Failed to write 4096 bytes "
                    "to file 7: No space left on device [os_error_code='28']")


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes(small_disk, monkeypatch):
  disk, mounted = small_disk("16m")
  workdir = runs.copy_run(runs.reference_run(), disk / "run", keep_up_to=8)
  before = {p: p.read_bytes() for p in (workdir / "checkpoints" / "8").rglob("*") if p.is_file()}
  if mounted:
    filler = _fill(disk, leave_bytes=64 << 10)  # less than one save: the step-12 save fails half-way
  else:
    real_save = Checkpointer.save

    def save_on_full_disk(self, step, *a, **k):
      with self._disk_full_is_one_line(step, 1 << 20):
        raise ValueError(_ORBAX_DISK_FULL)
    monkeypatch.setattr(Checkpointer, "save", save_on_full_disk)
  with pytest.raises(DiskFullError) as e:  # keeping every step: no deletion frees space mid-save
    trainer.train(runs.config(checkpoint__max_to_keep=100), str(workdir))
  msg = str(e.value)
  assert "\n" not in msg and "checkpoint step 12" in msg and str(workdir / "checkpoints") in msg, msg
  assert re.search(r"a save needs about [\d.]+ MiB; [\d.]+ MiB free", msg)
  assert "The last good checkpoint, step 8, is kept" in msg and "rerun the same command" in msg
  assert cli.describe(e.value) == (f"DiskFullError: {msg}", cli.EXIT_ERROR)
  assert {p: p.read_bytes() for p in (workdir / "checkpoints" / "8").rglob("*") if p.is_file()} == before
  # Space freed: the same command resumes from step 8 and trains exactly as the uninterrupted run.
  if mounted:
    filler.unlink()
  else:
    monkeypatch.setattr(Checkpointer, "save", real_save)
  trainer.train(runs.config(), str(workdir))
  assert runs.losses(workdir) == runs.losses(runs.reference_run())
