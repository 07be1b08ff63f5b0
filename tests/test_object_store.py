"""A work directory and data in a bucket (gs://), end to end, against a real GCS API server on
loopback (tests/gcs_emulator.py): one tiny train with checkpoints, metrics and TensorBoard events,
a resume that continues exactly, evaluate, export and generate from the bucket, text and ArrayRecord
data read from it, and the lease refusing a second writer. One train, reused by every test."""
import json

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
  logdir = f"{workdir}/tensorboard"
  shown = runs.tensorboard_scalars([storage.read_bytes(f"{logdir}/{n}") for n in sorted(storage.listdir(logdir))],
                                   "train/loss")
  assert sorted(shown) == list(range(1, runs.STEPS + 1))
  np.testing.assert_allclose([shown[s] for s in sorted(shown)], [first[s] for s in sorted(shown)], rtol=1e-6)


@pytest.fixture(scope="module")
def loaded(trained):
  from ztt_jax import restore
  return restore.load_trained(trained[0], devices=jax.devices()[:1])


def test_evaluate_export_and_generate_read_the_run_from_the_bucket(trained, loaded, tmp_path):
  from ztt_jax import decoding, evaluator, export, restore
  workdir, _ = trained
  run = loaded
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


def test_an_export_to_the_bucket_loads_back_and_overwrite_replaces_only_ours(trained, loaded):
  from ztt_jax import export, restore
  from ztt_jax.errors import OutputError
  workdir, _ = trained
  out = f"{BUCKET}/exports/run"
  storage.write_text(f"{BUCKET}/exports/run-notes/keep.txt", "a neighbour sharing the prefix's start")
  assert restore.export_run(workdir, out) == out
  assert storage.listdir(out) == [export.CONFIG_FILE, export.SAFETENSORS_FILE]
  model, params = export.load(out)
  _assert_tree_equal(params, loaded.params)
  assert export.read_config(out)["source"]["workdir"] == workdir
  with pytest.raises(OutputError, match="exists and is not empty; .* --overwrite"):
    restore.export_run(workdir, out)
  storage.write_text(f"{out}/notes.txt", "the user's")
  with pytest.raises(OutputError, match="not an export written by ztt_jax .*notes.txt"):
    export.save(out, model.cfg, params, overwrite=True)
  assert storage.read_text(f"{out}/notes.txt") == "the user's"
  storage.delete(f"{out}/notes.txt")
  # Replaced by another storage: the old params.safetensors goes, the neighbour stays.
  export.save(out, model.cfg, params, storage="orbax", overwrite=True)
  assert storage.listdir(out) == [export.CONFIG_FILE, export.ORBAX_DIR]
  _assert_tree_equal(export.load(out)[1], loaded.params)
  assert storage.exists(f"{BUCKET}/exports/run-notes/keep.txt")


def test_a_half_written_export_is_refused_by_readers_and_replaced_by_overwrite(loaded, monkeypatch):
  from ztt_jax import export, outdir
  from ztt_jax.errors import OutputError
  out = f"{BUCKET}/exports/half"
  cfg, params = loaded.cfg.model, loaded.params
  export.save(out, cfg, params)
  copy = storage.copy

  def killed_before_the_marker(src, dst):
    if dst.endswith("/" + export.CONFIG_FILE):
      raise KeyboardInterrupt  # as a kill would stop it: nothing after this runs
    copy(src, dst)

  monkeypatch.setattr(storage, "copy", killed_before_the_marker)
  with pytest.raises(KeyboardInterrupt):
    export.save(out, cfg, params, overwrite=True, dtype="bfloat16")
  monkeypatch.setattr(storage, "copy", copy)
  assert storage.listdir(out) == [outdir.WRITING, export.SAFETENSORS_FILE]
  with pytest.raises(export.ExportError, match=r"^\S+ is not a finished export: it holds .* Rerun the export"):
    export.load(out)
  with pytest.raises(OutputError, match="exists and is not empty"):
    export.save(out, cfg, params)
  export.save(out, cfg, params, overwrite=True)
  assert storage.listdir(out) == [export.CONFIG_FILE, export.SAFETENSORS_FILE]
  _assert_tree_equal(export.load(out)[1], params)


def test_a_hugging_face_directory_goes_to_the_bucket_and_is_read_back(bucket):
  from ztt_jax.convert import hf_io
  tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  out = hf_io.write(f"{bucket}/hf/x", lambda: ({"model_type": "gpt2"}, tensors, None), source="/nowhere")
  assert storage.listdir(out) == ["config.json", "model.safetensors", hf_io.MARKER]
  assert hf_io.is_ours(out) is None
  cfg, got = hf_io.read(out)
  assert cfg == {"model_type": "gpt2"}
  np.testing.assert_array_equal(got["w"], tensors["w"])


def test_evaluate_sweep_writes_its_json_and_plot_to_the_bucket(bucket):
  from ztt_jax import evaluate
  workdir = f"{bucket}/runs/swept"
  result = {"metric": "loss", "step": runs.STEPS, "points": [
      {"rule": "fixed", "parameter": c, "loss": 3.0 - c / 4, "mean_cycles": c, "compute_fraction": c / 2}
      for c in (1, 2)]}
  out, png = evaluate.write_sweep(result, workdir, None)
  assert (out, png) == (f"{workdir}/sweep_step{runs.STEPS}.json", f"{workdir}/sweep_step{runs.STEPS}.png")
  assert json.loads(storage.read_text(out)) == result
  assert storage.read_bytes(png).startswith(b"\x89PNG")


def _assert_tree_equal(got, want):
  want = jax.tree.map(np.asarray, jax.device_get(want))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
