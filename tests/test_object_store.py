"""A work directory and data in a bucket (gs://), end to end, against a real GCS API server on
loopback (tests/gcs_emulator.py): one tiny train with checkpoints, metrics and TensorBoard events,
a resume that continues exactly, evaluate, export and generate from the bucket, text and ArrayRecord
data read from it, and the lease refusing a second writer. One train, reused by every test."""
import json
import struct

import jax
import numpy as np
import pytest

import gcs_emulator
import runs
from ztt_jax import data as data_lib
from ztt_jax import lease as lease_lib
from ztt_jax import storage, trainer
from ztt_jax.errors import ConfigError, LeaseError

BUCKET = f"gs://{gcs_emulator.BUCKET}"


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator.running():
    yield BUCKET


@pytest.fixture(scope="module")
def trained(bucket):
  """A 16-step run in the bucket (checkpoints every 4), then resumed from step 12 as if killed
  before its last save: (workdir, losses before the resume)."""
  workdir = f"{bucket}/runs/tiny"
  cfg = runs.config(log__tensorboard=True)
  trainer.train(cfg, workdir)
  first = runs.losses(workdir)
  storage.rmtree(f"{workdir}/checkpoints/{runs.STEPS}")
  trainer.train(cfg, workdir)
  return workdir, first


def test_train_writes_everything_to_the_bucket_and_a_resume_continues_exactly(trained, tmp_path):
  workdir, first = trained
  assert sorted(first) == list(range(1, runs.STEPS + 1))
  rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  # One history: the resumed run dropped the rows past 12 and logged 13..16 again, equal to the first's.
  assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))
  assert runs.losses(workdir) == first
  steps = sorted(int(n) for n in storage.listdir(f"{workdir}/checkpoints") if n.isdigit())
  assert steps == [8, 12, 16]  # checkpoint.max_to_keep=3
  assert not storage.exists(f"{workdir}/{lease_lib.NAME}")  # released when training ended
  shown = _tensorboard_scalars(f"{workdir}/tensorboard", "train/loss")
  assert sorted(shown) == list(range(1, runs.STEPS + 1))
  np.testing.assert_allclose([shown[s] for s in sorted(shown)], [first[s] for s in sorted(shown)], rtol=1e-6)


def _tensorboard_scalars(logdir, tag):
  """{step: value} as TensorBoard shows it (a START session log hides earlier events at >= its step)."""
  from tensorboardX.proto import event_pb2
  shown = {}
  for name in storage.listdir(logdir):
    data, i = storage.read_bytes(f"{logdir}/{name}"), 0
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


def test_evaluate_export_and_generate_read_the_run_from_the_bucket(trained, tmp_path):
  from ztt_jax import decoding, evaluator, export, restore
  workdir, _ = trained
  run = restore.load_trained(workdir, devices=jax.devices()[:1])
  assert run.step == runs.STEPS
  result = evaluator.evaluate(run, max_batches=1)
  assert result["step"] == runs.STEPS and np.isfinite(result["loss"])
  out = restore.export_run(workdir, str(tmp_path / "export"), step=8)
  meta = export.read_config(out)
  assert meta["source"] == {"kind": "training_run", "workdir": workdir, "step": 8}
  gen = decoding.generate(run.run.model, run.params, np.array([1, 2, 3]), max_new_tokens=2)
  assert gen.num_new == 2


def test_text_and_array_record_data_are_read_from_the_bucket(bucket, tmp_path):
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.txt").write_text("hello object store " * 40)
  (tmp_path / "text" / "b.txt").write_text("a second document " * 40)
  data_lib.write_array_record(str(tmp_path / "train.array_record"),
                              [np.arange(i, i + 20) for i in range(12)])
  storage.upload(str(tmp_path / "text"), f"{bucket}/data/text")
  storage.upload(str(tmp_path / "train.array_record"), f"{bucket}/data/records/train.array_record")
  for kind, local, remote in [("text", tmp_path / "text", f"{bucket}/data/text"),
                              ("array_record", tmp_path / "train.array_record", f"{bucket}/data/records")]:
    batches = []
    for path in (str(local), remote):
      cfg = data_lib.DataConfig(kind=kind, path=path, seq_len=16, cache_dir=str(tmp_path / "cache"))
      it = data_lib.make_train_iterator(cfg, global_batch_size=4, vocab_size=300)
      batches.append([next(it) for _ in range(3)])
    for got, want in zip(*batches):
      np.testing.assert_array_equal(got["inputs"], want["inputs"])


def test_a_second_writer_is_refused_and_a_stale_lease_taken_over(bucket, caplog):
  import time
  workdir = f"{bucket}/runs/leased"
  first = lease_lib.Lease(workdir, timeout_s=600)
  first.me = {**first.me, "host": "elsewhere"}  # a run on another host, refreshed just now
  first.acquire()
  with pytest.raises(LeaseError, match="is being trained by pid .* on host elsewhere"):
    lease_lib.Lease(workdir, timeout_s=600).acquire()
  with pytest.raises(LeaseError):  # train refuses before compiling anything
    trainer.train(runs.config(), workdir)
  stale = json.loads(storage.read_text(f"{workdir}/{lease_lib.NAME}"))
  storage.write_text(f"{workdir}/{lease_lib.NAME}", json.dumps({**stale, "refreshed": time.time() - 700}))
  second = lease_lib.Lease(workdir, timeout_s=600)
  second.acquire()
  assert "Took over the lease" in caplog.text
  assert json.loads(storage.read_text(f"{workdir}/{lease_lib.NAME}"))["pid"] == second.me["pid"]
  second.release()
  assert not storage.exists(f"{workdir}/{lease_lib.NAME}")


def test_a_workdir_in_a_missing_bucket_is_one_config_error(bucket):
  with pytest.raises(ConfigError, match="cannot be written .* check that the bucket exists"):
    trainer.train(runs.config(), "gs://no-such-bucket/runs/x")


def test_an_export_to_a_bucket_is_refused_in_one_line(trained):
  from ztt_jax import restore
  from ztt_jax.errors import OutputError
  workdir, _ = trained
  with pytest.raises(OutputError, match="not supported; give a local --out"):
    restore.export_run(workdir, f"{BUCKET}/exports/x")
  assert not storage.exists(f"{BUCKET}/exports/x")
