"""Evaluation of a checkpoint: JSON fields against direct computations, and the exit-rule sweep."""
import json
import math
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from test_config import load_config
from ztt_jax import config as config_lib
from ztt_jax import data as data_lib
from ztt_jax import cli, evaluator, plots, restore
from ztt_jax import run as run_lib
from ztt_jax.checkpointing import Checkpointer
from ztt_jax.errors import CheckpointError, ConfigError
from ztt_jax.model import ExitRule

STEP = 7


def _random_checkpoint(workdir, cd) -> str:
  """A real checkpoint of config `cd` whose params are random draws (no training compile): zero
  keys of norm ~ sqrt(head_dim) make a0 vary between tokens, so thresholds split them."""
  cfg = config_lib.parse(cd)
  run = run_lib.build(cfg)
  rng = np.random.default_rng(0)

  def draw(path, a):
    name = path[-1].key
    scale = {"scale": 0.1, "zero_key_pool": 1.0, "embedding": 0.5}.get(name, 0.25)
    base = 1.0 if name == "scale" else 0.0
    return (base + scale * rng.normal(size=a.shape)).astype(a.dtype)

  params = jax.tree_util.tree_map_with_path(draw, run.abstract_state.params)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), run.abstract_state)
  state = state.replace(params=params, step=np.asarray(STEP, np.int32))
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size,
                                    vocab_size=cfg.model.vocab_size)
  ckpt = Checkpointer(str(workdir / "checkpoints"), cfg.checkpoint)
  ckpt.save(STEP, state, it, run_lib.layout_metadata(run), force=True)
  ckpt.close()
  return str(workdir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The tiny config (multi-hop) at 2 cycles: each fixed cut is a compile; 2 cycles still give
  tokens that exit or not."""
  cd = load_config("tiny")
  cd.model.num_cycles = 2
  return _random_checkpoint(tmp_path_factory.mktemp("run"), cd)


@pytest.fixture(scope="module")
def trained(workdir):
  return restore.load_trained(workdir)


@pytest.fixture(scope="module")
def batches(trained):
  return evaluator.held_out_batches(trained.cfg, max_batches=1)


@pytest.fixture(scope="module")
def no_exit(trained, batches):
  return evaluator.evaluate(trained, ExitRule.from_config(trained.cfg.model, threshold=None), batches=batches)


def flops_fraction(m, seq_len, mean_cycles):
  """Independent FLOPs count: every layer costs its projections, MLP and attention scores."""
  d, f = m.d_model, m.mlp_dim
  layer = 2 * (4 * d * d + 3 * d * f) + 2 * 2 * seq_len * d
  fixed = (m.n_head_layers + m.n_tail_layers) * layer + 2 * d * m.vocab_size
  return (fixed + mean_cycles * m.n_middle_layers * layer) / (fixed + m.num_cycles * m.n_middle_layers * layer)


def test_no_exit_fields(trained, no_exit):
  r = no_exit
  C = trained.cfg.model.num_cycles
  assert r["step"] == STEP and r["exit_threshold"] is None and r["num_cycles"] == C
  assert math.isclose(r["bits_per_byte"], r["loss"] / math.log(2), rel_tol=1e-12)
  assert "perplexity" not in r
  assert r["mean_cycles"] == C and math.isclose(r["compute_fraction"], 1.0)
  assert 0 <= r["accuracy"] <= 1
  assert set(r["per_difficulty"]) == {"1", "2", "3"}
  for h in r["per_difficulty"].values():
    assert h["mean_cycles"] == C and math.isclose(h["compute_fraction"], 1.0)


def test_exit_metrics_match_a_direct_computation(trained, batches, no_exit):
  cfg, run = trained.cfg, trained.run
  signals = evaluator.signal_values(trained, batches, "zero_attention")
  tau = float(np.median(signals))
  r = evaluator.evaluate(trained, ExitRule.from_config(cfg.model, threshold=tau), batches=batches)
  # Directly: the model on the same batches, per-query answers and cycles in numpy (multi-hop
  # `difficulty` is per token: the scored tokens carry their query's depth).
  rule = ExitRule.from_config(cfg.model, threshold=tau, frozen_kv="state")
  fn = jax.jit(lambda p, x: run.model.apply({"params": p}, x, rule))
  b = batches[0]
  logits, aux = jax.device_get(fn(trained.params, b["inputs"]))
  w = b["weights"]
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]))
  scored = b["difficulty"] > 0
  np.testing.assert_array_equal(scored, w > 0)
  correct = (logits.argmax(-1) == b["targets"])[scored]
  cycles = np.asarray(aux["cycles_used"])[scored]
  difficulty = b["difficulty"][scored]
  # The sweep's values are the first cycle's mean a0 (of 2; the cycle every token runs) on the
  # scored tokens, as the model's own aux gives it.
  np.testing.assert_allclose(np.sort(signals), np.sort(np.asarray(aux["zero_attention"])[0][scored]), atol=1e-6)
  np.testing.assert_allclose(r["loss"], (ce * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(r["accuracy"], correct.mean())
  np.testing.assert_allclose(r["mean_cycles"], (np.asarray(aux["cycles_used"]) * w).sum() / w.sum(), rtol=1e-6)
  for d in np.unique(difficulty):
    np.testing.assert_allclose(r["per_difficulty"][str(d)]["accuracy"], correct[difficulty == d].mean())
    np.testing.assert_allclose(r["per_difficulty"][str(d)]["mean_cycles"], cycles[difficulty == d].mean(), rtol=1e-6)
  assert 1 <= r["mean_cycles"] < cfg.model.num_cycles
  np.testing.assert_allclose(r["compute_fraction"], flops_fraction(cfg.model, cfg.data.seq_len, r["mean_cycles"]),
                             rtol=1e-9)
  assert r["compute_fraction"] < 1
  assert r["loss"] != no_exit["loss"]


def test_sweep_writes_json_and_png(trained, batches, no_exit, tmp_path):
  C = trained.cfg.model.num_cycles
  s = evaluator.sweep(trained, batches=batches, num_thresholds=3)
  path = evaluator.write_json(s, str(tmp_path / "sweep.json"))
  png = plots.plot_quality_vs_compute(plots.load_sweep(path), str(tmp_path / "sweep.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(path) as f:
    saved = json.load(f)
  assert saved["metric"] == "accuracy" and saved["step"] == STEP
  points = saved["points"]
  assert {p["rule"] for p in points} == {"fixed", *evaluator.sweep_signals(trained.cfg.model)}
  for p in points:
    assert {"rule", "parameter", "loss", "accuracy", "mean_cycles", "compute_fraction"} <= set(p)
    # every point of every rule carries the bake-off's mean cycles and accuracy by difficulty
    assert set(p["per_difficulty"]) == {"1", "2", "3"}
    assert all({"accuracy", "mean_cycles"} <= set(by) for by in p["per_difficulty"].values())
  fixed = sorted((p for p in points if p["rule"] == "fixed"), key=lambda p: p["parameter"])
  assert [p["parameter"] for p in fixed] == list(range(1, C + 1))
  assert [p["mean_cycles"] for p in fixed] == list(range(1, C + 1))
  assert all(a["compute_fraction"] < b["compute_fraction"] for a, b in zip(fixed, fixed[1:]))
  # Cutting after the last cycle is no exit at all.
  assert fixed[-1]["loss"] == pytest.approx(no_exit["loss"], rel=1e-6)
  assert fixed[-1]["accuracy"] == no_exit["accuracy"]
  for rule in ("zero_attention", "confidence"):
    pts = sorted((p for p in points if p["rule"] == rule), key=lambda p: p["parameter"])
    assert len(pts) >= 2
    # The grid runs from exiting at the first chance to never exiting.
    assert pts[0]["mean_cycles"] == 1 and pts[-1]["mean_cycles"] == C
    assert pts[-1]["loss"] == pytest.approx(no_exit["loss"], rel=1e-5)
  conf = [p for p in points if p["rule"] == "confidence"]
  assert all(p["compute_fraction_incl_signal"] > p["compute_fraction"] for p in conf)


def test_bad_inputs_name_the_fix(trained, workdir, tmp_path):
  with pytest.raises(CheckpointError, match="--workdir"):
    restore.load_trained(str(tmp_path / "missing"))
  with pytest.raises(CheckpointError, match=f"available: \\[{STEP}\\]"):
    restore.load_trained(workdir, step=STEP + 1)
  with pytest.raises(ConfigError, match="none for no exit"):
    evaluator.evaluate(trained, ExitRule.from_config(trained.cfg.model, threshold="abc"), batches=[])
  with pytest.raises(ConfigError, match="a number"):
    cli.threshold_flag("half")
  assert cli.threshold_flag("none") == {"threshold": None} and cli.threshold_flag(None) == {}


@pytest.mark.parametrize("tool", ["evaluate --sweep", "generate --prompt=a"])
def test_cli_names_a_bad_flag_in_one_line(tool, workdir):
  """Both tools read --exit_threshold through cli.load_trained_run, before any checkpoint loads."""
  module, flag = tool.split()
  proc = subprocess.run([sys.executable, "-m", f"ztt_jax.{module}", flag, f"--workdir={workdir}",
                         "--exit_threshold=half"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == ["ConfigError: --exit_threshold='half': give a number (e.g. 0.5) or none"]


def test_test_time_depth_matches_a_direct_computation(trained):
  """--max_difficulty/--num_cycles on multi-hop: held-out queries of 1..H lookups (H past the
  trained 3), run for more cycles than trained; compared with the model applied directly to
  examples from make_example."""
  from ztt_jax.data import multihop
  cfg, run = trained.cfg, trained.run
  H, C = cfg.data.max_hops + 2, cfg.model.num_cycles + 2
  r = evaluator.evaluate(trained, ExitRule.from_config(cfg.model, threshold=None), max_batches=1,
                         num_cycles=C, max_difficulty=H)
  assert (r["num_cycles"], r["trained_cycles"], r["max_difficulty"], r["trained_max_difficulty"]) == (C, C - 2, H, H - 2)
  assert set(r["per_difficulty"]) == {str(h) for h in range(1, H + 1)}
  n = cfg.eval.batch_size or cfg.train.global_batch_size
  examples = [multihop.make_example(cfg.data.seed, multihop.EVAL_STREAM, i, H, cfg.data.num_queries,
                                    cfg.data.num_distractors, start=i % H) for i in range(n)]
  T = max(len(t) for t, _, _ in examples) - 1
  tokens = np.zeros((n, T + 1), np.int32)
  for i, (t, _, _) in enumerate(examples):
    tokens[i, :len(t)] = t
  logits, aux = jax.device_get(jax.jit(lambda p, x: run.model.apply({"params": p}, x, None, C))(
      trained.params, tokens[:, :-1]))
  assert (np.asarray(aux["cycles_used"]) == C).all()
  by_hop = {}
  for i, (t, pos, hops) in enumerate(examples):
    for p, h in zip(pos, hops):
      by_hop.setdefault(int(h), []).append(logits[i, p - 1].argmax() == t[p])
  for h, ok in by_hop.items():
    np.testing.assert_allclose(r["per_difficulty"][str(h)]["accuracy"], np.mean(ok))
  with pytest.raises(ConfigError, match="alphabet|variables"):
    evaluator.at_difficulty(cfg, 40)


def test_test_time_depth_on_propagation_matches_a_direct_computation(tmp_path):
  """--max_difficulty/--num_cycles on the propagation task: marker gaps of 1..N windows (N past the
  trained 4), seq_len grown to fit one gap, run for more cycles than trained; compared with the
  model applied directly to rows from make_row."""
  from ztt_jax.data import propagation
  from ztt_jax.data.config import propagation_min_seq_len
  from ztt_jax.data.synthetic import EVAL_STREAM
  cd = load_config("tiny")
  cd.model.num_cycles = 2
  cd.model.attention_window = cd.data.window = 3
  cd.model.position = "learned"  # so a long enough N passes the position table
  cd.data.kind, cd.data.max_difficulty, cd.data.seq_len = "propagation", 4, 16
  trained = restore.load_trained(_random_checkpoint(tmp_path, cd))
  cfg, run = trained.cfg, trained.run
  N, C, w = 8, 3, 3
  T = propagation_min_seq_len(w, N)
  assert cfg.data.seq_len < T <= cfg.model.max_seq_len
  r = evaluator.evaluate(trained, ExitRule.from_config(cfg.model, threshold=None), max_batches=1,
                         num_cycles=C, max_difficulty=N)
  assert (r["num_cycles"], r["trained_cycles"], r["max_difficulty"], r["trained_max_difficulty"]) == (C, 2, N, 4)
  assert set(r["per_difficulty"]) == {str(d) for d in range(1, N + 1)}
  n = cfg.eval.batch_size or cfg.train.global_batch_size
  rows = [propagation.make_row(cfg.data.seed, EVAL_STREAM, i, T, w, N) for i in range(n)]
  inputs, targets, difficulty = (np.stack(x) for x in zip(*rows))
  logits, aux = jax.device_get(jax.jit(lambda p, x: run.model.apply({"params": p}, x, None, C))(
      trained.params, inputs))
  assert (np.asarray(aux["cycles_used"]) == C).all()
  correct = logits.argmax(-1) == targets
  for d in range(1, N + 1):
    np.testing.assert_allclose(r["per_difficulty"][str(d)]["accuracy"], correct[difficulty == d].mean())
  np.testing.assert_allclose(r["accuracy"], correct[difficulty > 0].mean())
  with pytest.raises(ConfigError, match="position table"):
    evaluator.at_difficulty(cfg, 30)
  with pytest.raises(ConfigError, match="must be >= 1"):
    evaluator.at_difficulty(cfg, 0)
