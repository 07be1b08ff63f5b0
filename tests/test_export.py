"""Params-only exports: a run's checkpoint -> export -> load gives the same params and logits."""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from ztt_jax import config as config_lib
from ztt_jax import data as data_lib
from ztt_jax import export, restore
from ztt_jax import run as run_lib
from ztt_jax.checkpointing import Checkpointer
from ztt_jax.errors import OutputError
from ztt_jax.model import ZTTModel
from model_testutil import init_params
from test_config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKS = np.random.default_rng(1).integers(0, 259, (2, 12))


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  model = ZTTModel(cfg)
  return jax.jit(lambda p, t: model.apply({"params": p}, t)[0])


def logits(model, params):
  return np.asarray(_apply(model.cfg)(params, jnp.asarray(TOKS)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A work directory holding one checkpoint (step 5) of the tiny ZTT, with random params.

  Written through the trainer's own Checkpointer and metadata, so `load_trained` reads it as any
  run; building the state from an export skips compiling the random init and a train step.
  """
  tmp = tmp_path_factory.mktemp("export")
  cd = load_config("tiny")
  cd.mesh.shape = (2, 1, 1)
  cfg = config_lib.parse(cd)
  r = run_lib.build(cfg, jax.devices()[:2])
  _, params = init_params(cfg.model)
  params = jax.tree.map(np.asarray, params)
  seed_export = export.save(str(tmp / "seed"), cfg.model, params)
  state = restore.init_from_export(seed_export, r).replace(step=jnp.asarray(5, jnp.int32))
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size,
                                    vocab_size=cfg.model.vocab_size)
  ckpt = Checkpointer(str(tmp / "run" / "checkpoints"), cfg.checkpoint)
  ckpt.save(5, state, it, run_lib.layout_metadata(r), force=True)
  ckpt.close()
  return tmp / "run", cfg, params


@pytest.mark.parametrize("storage", ["safetensors", "orbax"])
@pytest.mark.parametrize("unscan", [False, True])
def test_export_then_load_gives_equal_params_and_logits(run, tmp_path, storage, unscan):
  workdir, cfg, params = run
  out = restore.export_run(str(workdir), str(tmp_path / "exp"), storage=storage, unscanned=unscan)
  model, loaded = export.load(out)
  assert model.cfg == cfg.model  # config embedded: no training config needed
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  np.testing.assert_array_equal(logits(model, loaded), logits(ZTTModel(cfg.model), params))

  meta = json.loads((tmp_path / "exp" / "config.json").read_text())
  assert meta["source"]["step"] == 5 and meta["unscanned"] == unscan and meta["storage"] == storage
  if storage == "safetensors":
    with safe_open(str(tmp_path / "exp" / export.SAFETENSORS_FILE), "numpy") as f:
      names = set(f.keys())
  else:
    import orbax.checkpoint as ocp
    with ocp.PyTreeCheckpointer() as c:
      names = set(traverse_util.flatten_dict(c.restore(str(tmp_path / "exp" / export.ORBAX_DIR)), sep="/"))
  k = cfg.model.n_middle_layers
  if unscan:  # each middle layer has its own tensors, without the stacked 'layers' axis
    assert {f"middle/layers_{i}/attn/q_kernel" for i in range(k)} <= names
    assert "middle/layers/attn/q_kernel" not in names
    if storage == "safetensors":
      layer1 = load_file(str(tmp_path / "exp" / export.SAFETENSORS_FILE))["middle/layers_1/attn/q_kernel"]
      np.testing.assert_array_equal(layer1, params["middle"]["layers"]["attn"]["q_kernel"][1])
  else:
    assert "middle/layers/attn/q_kernel" in names


def test_bfloat16_export_cli(run, tmp_path):
  workdir, cfg, params = run
  out = tmp_path / "bf16"
  proc = subprocess.run([sys.executable, "-m", "ztt_jax.export", f"--workdir={workdir}", f"--out={out}",
                         "--format=orbax", "--unscan", "--dtype=bfloat16", "--step=5"],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "step 5" in proc.stdout
  model, loaded = export.load(str(out))
  assert model.cfg.param_dtype == "bfloat16"
  assert {a.dtype for a in jax.tree.leaves(loaded)} == {np.dtype(ml_dtypes.bfloat16)}
  # exactly the float32 params rounded to bfloat16, and logits close to the float32 model's
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16)), loaded, params)
  got, want = logits(model, loaded), logits(ZTTModel(cfg.model), params)
  assert got.dtype == np.float32
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()

  # fine-tuning from it runs in the run's float32 params
  got = jax.device_get(restore.load_init_params(str(out), run_lib.build(cfg, jax.devices()[:2])))
  assert {a.dtype for a in jax.tree.leaves(got)} == {np.dtype(np.float32)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16).astype(np.float32)),
               got, params)


# ------------------------------------------------------------------ missing or damaged exports

def test_missing_and_damaged_exports_are_named(run, tmp_path):
  workdir, cfg, params = run
  with pytest.raises(export.ExportError, match="No export"):
    export.load(str(tmp_path / "nope"))
  with pytest.raises(export.ExportError, match="export it first"):
    export.load(str(workdir))  # a training run, not an export
  with pytest.raises(export.CheckpointError, match="No checkpoints"):
    restore.export_run(str(tmp_path / "nope"), str(tmp_path / "x"))

  good = export.save(str(tmp_path / "good"), cfg.model, params)
  file = os.path.join(good, export.SAFETENSORS_FILE)
  tensors = load_file(file)
  with safe_open(file, "numpy") as f:
    meta = f.metadata()

  missing = export.save(str(tmp_path / "missing"), cfg.model, params)
  save_file({k: v for k, v in tensors.items() if k != "zero_key_pool"},
            os.path.join(missing, export.SAFETENSORS_FILE), metadata=meta)
  with pytest.raises(export.ExportError, match="missing.*zero_key_pool"):
    export.load(missing)

  truncated = export.save(str(tmp_path / "truncated"), cfg.model, params)
  with open(os.path.join(truncated, export.SAFETENSORS_FILE), "r+b") as f:
    f.truncate(os.path.getsize(file) // 2)
  with pytest.raises(export.ExportError, match="damaged or truncated"):
    export.load(truncated)

  no_params = export.save(str(tmp_path / "no_params"), cfg.model, params, storage="orbax")
  import shutil
  shutil.rmtree(os.path.join(no_params, export.ORBAX_DIR))
  with pytest.raises(export.ExportError, match="incomplete"):
    export.load(no_params)

  bad_json = export.save(str(tmp_path / "bad_json"), cfg.model, params)
  with open(os.path.join(bad_json, export.CONFIG_FILE), "w") as f:
    f.write("{not json")
  with pytest.raises(export.ExportError, match="damaged"):
    export.load(bad_json)

  # The safetensors file alone carries the config too.
  model, loaded = export.load(file)
  assert model.cfg == cfg.model

  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  # A non-empty directory is refused; with overwrite=True still, as ztt_jax did not write it.
  with pytest.raises(OutputError, match="not empty.*--overwrite"):
    export.save(str(other), cfg.model, params)
  with pytest.raises(OutputError, match="not an export written by ztt_jax"):
    export.save(str(other), cfg.model, params, overwrite=True)
  assert (other / "notes.txt").read_text() == "mine"
