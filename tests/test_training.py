"""The training system end to end: sharding, exact resume, restore on another mesh, learning."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ztt_jax import config as config_lib
from ztt_jax import data as data_lib
from ztt_jax import run as run_lib
from ztt_jax import trainer
from ztt_jax.checkpointing import Checkpointer
from ztt_jax.metrics import read_metrics
import runs
from runs import losses
from test_config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(**overrides):
  cfg = load_config("tiny")
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    cfg[section][field] = value
  return config_lib.parse(cfg)


def test_sharded_training_equals_single_device(tmp_path):
  ref_dir = tmp_path / "single"
  trainer.train(tiny(mesh__shape=(1, 1, 1), train__steps=3, eval__max_batches=0), str(ref_dir),
                devices=jax.devices()[:1])
  reference = losses(ref_dir)
  assert sorted(reference) == [1, 2, 3]
  # Mesh (2, 4, 1) is compared with the one-device reference in tests/test_multihost.py (two
  # processes of 4 devices each), so it is not trained again here.
  for shape in [(8, 1, 1), (2, 2, 2)]:
    workdir = tmp_path / "x".join(map(str, shape))
    trainer.train(tiny(mesh__shape=shape, train__steps=3, eval__max_batches=0), str(workdir))
    got = losses(workdir)
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                               rtol=2e-5, err_msg=f"mesh {shape}")


def test_params_and_optimizer_state_are_sharded_by_the_rules():
  run = run_lib.build(tiny(mesh__shape=(2, 2, 2)))
  state = run.init(jax.random.key(0))
  specs = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.sharding.spec
           for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  sharded = {name: spec for name, spec in specs.items() if any(ax is not None for ax in spec)}
  assert sharded, "no parameter is sharded"
  assert any("tensor" in str(s) for s in sharded.values()), specs
  assert any("fsdp" in str(s) for s in sharded.values()), specs
  # Every leaf of the Adam moments has its param's sharding, not a single device.
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  adam = [s for s in jax.tree_util.tree_leaves(state.opt_state) if getattr(s, "ndim", 0) >= 2]
  assert adam and all(len(a.sharding.device_set) == 8 for a in adam)
  for p_leaf, m_leaf in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(mu)):
    assert p_leaf.sharding.spec == m_leaf.sharding.spec


def test_restore_on_another_mesh_gives_equal_params(tmp_path):
  trainer.train(tiny(mesh__shape=(2, 4, 1), train__steps=3, checkpoint__every_steps=3, eval__max_batches=0),
                str(tmp_path))
  restored = {}
  for shape in [(2, 4, 1), (8, 1, 1)]:
    cfg = tiny(mesh__shape=shape)
    run = run_lib.build(cfg)
    it = data_lib.make_train_iterator(
        cfg.data, global_batch_size=cfg.train.global_batch_size, vocab_size=cfg.model.vocab_size)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint)
    r = ckpt.restore(run.abstract_state, it)
    ckpt.close()
    assert r.step == 3
    restored[shape] = r.state
    leaf = jax.tree_util.tree_leaves(r.state.params)[0]
    assert leaf.sharding.mesh.devices.shape == shape
  a, b = (jax.device_get(restored[s].params) for s in restored)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _train_cmd(workdir, *flags):
  return [sys.executable, "-m", "ztt_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          *flags]


def test_exact_resume_after_sigkill(tmp_path):
  flags = ["--config.train.steps=40", "--config.checkpoint.every_steps=10",
           "--config.eval.every_steps=1000", "--config.log.tensorboard=False"]
  env = runs.env()
  straight = tmp_path / "straight"
  subprocess.run(_train_cmd(straight, *flags), cwd=ROOT, env=env, check=True, capture_output=True)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(killed, *flags), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (killed / "checkpoints" / "10" / "_CHECKPOINT_METADATA").exists():
    assert proc.poll() is None, "training ended before the first checkpoint"
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before_kill = max(losses(killed))
  assert done_before_kill < 40, "the kill came too late to test anything"

  # kill -9 left the lease behind; the rerun takes it over (its pid is gone) and releases it at the end.
  assert json.loads((killed / "lease.json").read_text())["pid"] == proc.pid
  rerun = subprocess.run(_train_cmd(killed, *flags), cwd=ROOT, env=env, check=True, capture_output=True, text=True)
  assert f"Took over the lease of {killed} from pid {proc.pid}" in rerun.stderr, rerun.stderr[-3000:]
  assert not (killed / "lease.json").exists()
  want, got = losses(straight), losses(killed)
  assert sorted(got) == list(range(1, 41))
  # One history: the steps the killed run logged past checkpoint 10 were dropped, not kept twice.
  assert [row["step"] for row in read_metrics(killed)] == [row["step"] for row in read_metrics(straight)]
  for step in range(11, 41):  # bitwise: the data iterator resumed exactly too
    assert got[step] == want[step], (step, got[step], want[step])


def test_default_config_learns(tmp_path):
  # Logged every 10 steps: the default config logs every 100, which would make step 200 one of the
  # two "first" losses below. A subprocess with XLA's optimising backend: 120 steps cost more to run
  # than to compile.
  flags = ["--config=configs/default.py", "--config.train.steps=120", "--config.log.every_steps=10",
           "--config.eval.every_steps=1000", "--config.eval.max_batches=2"]
  r = subprocess.run(runs.train_cmd(tmp_path, *flags), cwd=ROOT, env=runs.env(optimized=True),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  curve = losses(tmp_path)
  first, last = np.mean([curve[s] for s in sorted(curve)[:2]]), curve[120]
  assert last < 0.6 * first, (first, last)
