"""The looped-training recipes (issue 9 §2), each against an independent reference: random cycle
count per step, truncated backprop, input injection, the learned exit gate, and all of them through
the real trainer (with an exact resume) and the exit sweep."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

import model_numpy_ref as ref
from model_testutil import init_params, jitted_apply, tiny_cfg, tokens
from runs import losses
from test_config import load_config
from test_generate import decode_teacher_forced
from ztt_jax import config as config_lib
from ztt_jax import evaluator, restore, trainer
from ztt_jax.errors import ConfigError
from ztt_jax.model import ExitRule
from ztt_jax.model.block import Block
from ztt_jax.model.config import EXIT_SIGNALS
from ztt_jax.model.exit import halting_distribution, kl_to_uniform
from ztt_jax.model.layers import Norm
from ztt_jax.train_step import gate_loss_sums, sampled_cycles


def _cfg(**train):
  cd = load_config("tiny")
  cd.train.update(train)
  return config_lib.parse(cd)


# ------------------------------------------------------------------ random cycle count

def test_cycle_count_is_a_function_of_seed_and_step():
  cfg = _cfg(cycles_distribution="poisson", cycles_mean=2.0)
  seq = [sampled_cycles(cfg, s) for s in range(1, 401)]
  assert seq == [sampled_cycles(cfg, s) for s in range(1, 401)]  # a resumed run draws the same
  assert set(seq) == {1, 2, 3}  # clipped to cycles_max = model.num_cycles = 3, and all of them occur
  assert seq != [sampled_cycles(_cfg(cycles_distribution="poisson", cycles_mean=2.0, seed=1), s)
                 for s in range(1, 401)]
  assert sampled_cycles(_cfg(), 5) is None  # off: the configured cycles, the step's default program


@pytest.mark.parametrize("dist, mean, tol", [("poisson", 4.0, 0.1), ("lognormal_poisson", 4.0, 0.15)])
def test_cycle_count_mean(dist, mean, tol):
  cfg = _cfg(cycles_distribution=dist, cycles_mean=mean, cycles_max=100)  # no clipping in reach
  draws = np.array([sampled_cycles(cfg, s) for s in range(4000)])
  assert draws.min() >= 1 and abs(draws.mean() - mean) < tol, draws.mean()
  if dist == "lognormal_poisson":  # heavier-tailed than Poisson with the same mean
    poisson_cfg = _cfg(cycles_distribution="poisson", cycles_mean=mean, cycles_max=100)
    poisson = np.array([sampled_cycles(poisson_cfg, s) for s in range(4000)])
    assert draws.var() > 1.3 * poisson.var()


def test_cycle_count_config_errors_name_the_fix():
  with pytest.raises(ConfigError, match="cycles_distribution"):
    _cfg(cycles_distribution="uniform")
  with pytest.raises(ConfigError, match="cycles_mean"):
    _cfg(cycles_distribution="poisson", cycles_mean=0.5)
  cd = load_config("tiny")
  cd.model.variant, cd.model.exit_threshold = "vanilla", None
  cd.train.cycles_distribution = "poisson"
  with pytest.raises(ConfigError, match="one pass"):
    config_lib.parse(cd)


# ------------------------------------------------------------------ truncated backprop

def _layer(tree, j):
  return jax.tree.map(lambda a: a[j], tree)


def _unrolled_logits(cfg, p, toks, C, k, inject):
  """Plain loop: embed, head block, C cycles of the middle blocks (pool row c), stop_gradient on the
  state entering cycle C - k, final norm, tied LM head. inject: x + norm(head output) W per cycle."""
  blk, norm = Block(cfg), Norm(cfg)
  x = p["embed"]["embedding"][toks]
  x = blk.apply({"params": _layer(p["head"]["layers"], 0)}, x, (None, None), None).x
  inj = norm.apply({"params": p["inject"]["norm"]}, x) @ p["inject"]["kernel"] if inject else 0.0
  for c in range(C):
    if c == C - k:
      x = jax.lax.stop_gradient(x)
    h = x + inj
    for j in range(cfg.n_middle_layers):
      h = blk.apply({"params": _layer(p["middle"]["layers"], j)}, h, (p["zero_key_pool"][c][j], None), None).x
    x = h
  return norm.apply({"params": p["final_norm"]}, x) @ p["embed"]["embedding"].T


@pytest.mark.parametrize("inject", [False, True])
def test_truncated_backprop_equals_unrolled_reference_with_stop_gradient(inject):
  # 3 cycles run of a 4-row pool (a sampled count below the pool), gradient through the last 2.
  C, k = 3, 2
  cfg = tiny_cfg(num_cycles=4, n_tail_layers=0, backprop_cycles=k, input_injection="head" if inject else "none")
  model, params = init_params(cfg)
  toks = tokens(cfg)
  w = jax.random.normal(jax.random.key(1), (2, 6, cfg.vocab_size))
  g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, toks, None, C)[0] * w)))(params)
  g_ref = jax.jit(jax.grad(lambda p: jnp.sum(_unrolled_logits(cfg, p, toks, C, k, inject) * w)))(params)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()) + 1e-12,
                               err_msg=jax.tree_util.keystr(path))
  pool = np.abs(np.asarray(g["zero_key_pool"])).reshape(4, -1).max(-1)
  assert pool[0] == 0 and pool[3] == 0 and pool[1] > 0 and pool[2] > 0  # rows C-k.. only; row 3 unused
  head = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g["head"]))
  assert (head > 0) == inject  # without injection nothing the head computes reaches the last k cycles


def _residual_bytes(cfg, C):
  model, params = init_params(cfg)
  toks = tokens(cfg)
  res = saved_residuals(lambda p: jnp.sum(model.apply({"params": p}, toks, None, C)[0]), params)
  return sum(math.prod(a.shape) * a.dtype.itemsize for a, _ in res)


def test_truncated_backprop_saves_nothing_for_the_stopped_cycles():
  cfg = tiny_cfg(num_cycles=8, backprop_cycles=2)
  assert _residual_bytes(cfg, 4) == _residual_bytes(cfg, 8)  # bounded by k, whatever C
  full = tiny_cfg(num_cycles=8)
  assert _residual_bytes(full, 8) > _residual_bytes(full, 4) > _residual_bytes(cfg, 8)


# ------------------------------------------------------------------ input injection

@pytest.mark.parametrize("source", ["head", "embed"])
def test_injection_at_zero_weight_is_no_injection_and_otherwise_matches_reference(source):
  plain = tiny_cfg(num_cycles=2)
  cfg = tiny_cfg(num_cycles=2, input_injection=source)
  model, params = init_params(cfg)
  toks = tokens(cfg)
  zero = {**params, "inject": {**params["inject"], "kernel": jnp.zeros_like(params["inject"]["kernel"])}}
  without = {k: v for k, v in params.items() if k != "inject"}
  got, _ = jitted_apply(model)(zero, toks)
  want, _ = jitted_apply(init_params(plain)[0])(without, toks)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # With a non-zero adapter: the float64 numpy reference with the injection written out.
  p = ref.to_np(params)
  x = p["embed"]["embedding"][np.asarray(toks)]
  e = x
  x, _ = ref.stack(p["head"], x, cfg, cfg.n_head_layers)
  inj = ref.norm(p["inject"]["norm"], x if source == "head" else e, cfg) @ p["inject"]["kernel"]
  for c in range(cfg.cycles):
    x, _ = ref.stack(p["middle"], x + inj, cfg, cfg.stack_layers, p["zero_key_pool"][c])
  got, _ = jitted_apply(model)(params, toks)
  np.testing.assert_allclose(np.asarray(got), ref.readout(p, x, cfg), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-2  # the adapter does something


# ------------------------------------------------------------------ token shift

def test_token_shift_at_zero_weight_is_no_shift_and_otherwise_matches_reference():
  plain = tiny_cfg(num_cycles=2)
  cfg = tiny_cfg(num_cycles=2, token_shift=True)
  model, params = init_params(cfg)
  toks = tokens(cfg)
  zero = {**params, "embed": {**params["embed"], "shift_kernel": jnp.zeros_like(params["embed"]["shift_kernel"])}}
  without = {**params, "embed": {k: v for k, v in params["embed"].items() if k != "shift_kernel"}}
  got, _ = jitted_apply(model)(zero, toks)
  want, _ = jitted_apply(init_params(plain)[0])(without, toks)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # With a non-zero shift: the float64 numpy reference, e_t + e_{t-1} W (e_{-1} = 0).
  p = ref.to_np(params)
  e = p["embed"]["embedding"][np.asarray(toks)]
  prev = np.concatenate([np.zeros_like(e[:, :1]), e[:, :-1]], axis=1)
  x, _ = ref.stack(p["head"], e + prev @ p["embed"]["shift_kernel"], cfg, cfg.n_head_layers)
  for c in range(cfg.cycles):
    x, _ = ref.stack(p["middle"], x, cfg, cfg.stack_layers, p["zero_key_pool"][c])
  got, _ = jitted_apply(model)(params, toks)
  np.testing.assert_allclose(np.asarray(got), ref.readout(p, x, cfg), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-2  # the shift does something


@pytest.mark.parametrize("prefill", [1, 3])
def test_cached_decoding_with_token_shift_equals_full_forward(prefill):
  """The token before each decoding step comes from the cache (prev_token), not from the step."""
  cfg = tiny_cfg(num_cycles=2, token_shift=True)
  model, params = init_params(cfg)
  toks = tokens(cfg)
  want, _ = jitted_apply(model)(params, toks)
  got, _ = decode_teacher_forced(model, params, toks, None, "state", prefill)
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ the learned exit gate

def _survival_reference(lam):
  """Plain Python over cycles: p(c) = lam_c * prod_{j<c} (1 - lam_j), the last cycle the rest."""
  C = lam.shape[0]
  p = np.zeros_like(lam, np.float64)
  for idx in np.ndindex(lam.shape[1:]):
    alive = 1.0
    for c in range(C):
      p[(c,) + idx] = alive if c == C - 1 else alive * lam[(c,) + idx]
      alive *= 1.0 - lam[(c,) + idx]
  return p


def test_halting_distribution_sums_to_one_and_equals_survival_loop():
  lam = np.random.default_rng(0).uniform(size=(5, 3, 4))
  lam[1, 0, 0], lam[0, 1, 1], lam[2, 2, 2] = 1.0, 0.0, 1.0  # saturated gates
  p = np.asarray(halting_distribution(jnp.asarray(lam, jnp.float32)))
  np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
  np.testing.assert_allclose(p, _survival_reference(lam), atol=1e-6)
  assert (p >= 0).all() and p[2:, 0, 0].max() == 0  # nothing survives a gate of 1
  kl = np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0), 0) + math.log(5)
  np.testing.assert_allclose(np.asarray(kl_to_uniform(jnp.asarray(p))), kl, atol=1e-5)
  grad = jax.grad(lambda l: jnp.sum(kl_to_uniform(halting_distribution(l))))(jnp.asarray(lam, jnp.float32))
  assert np.isfinite(np.asarray(grad)).all()


def _gate_model(**kw):
  cfg = tiny_cfg(exit_gate=True, input_injection="head", zero_token_layers="all", zero_bias=True, **kw)
  model, params = init_params(cfg, 2, 8)
  return cfg, model, params, tokens(cfg, 2, 8)


def test_gate_loss_terms_and_exit_match_plain_python():
  cfg, model, params, toks = _gate_model(exit_gate_kl_weight=0.3, exit_gate_loss_weight=0.7)
  _, aux = jitted_apply(model)(params, toks)
  lam = np.asarray(aux["exit_gate"], np.float64)
  targets = np.asarray(tokens(cfg, 2, 8, seed=5))
  w = np.random.default_rng(2).uniform(size=targets.shape)
  cyc = np.asarray(aux["cycle_logits"], np.float64)
  logp = cyc - cyc.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[None, ..., None], -1)[..., 0]
  p = _survival_reference(lam)
  want = 0.7 * np.sum(np.sum(p * ce, 0) * w) + 0.3 * np.sum((np.sum(p * np.log(p), 0) + math.log(cfg.cycles)) * w)
  got, stats = gate_loss_sums(cfg, aux["exit_gate"], jnp.asarray(ce, jnp.float32), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # At inference a token exits after the first cycle whose CDF 1 - prod(1 - lam) reaches tau.
  cdf = 1.0 - np.cumprod(1.0 - lam, 0)
  tau = ref.gap_thresholds(cdf[:-1])[0]
  _, aux = jitted_apply(model, signal="gate")(params, toks, tau)
  lam_run = np.asarray(aux["exit_gate"], np.float64)  # what each token saw, 0 after its exit
  used = np.asarray(aux["cycles_used"])
  cdf_run = 1.0 - np.cumprod(1.0 - lam_run, 0)
  want_used = np.where((cdf_run >= tau).any(0), (cdf_run >= tau).argmax(0) + 1, cfg.cycles)
  np.testing.assert_array_equal(used, np.minimum(want_used, cfg.cycles))
  assert len(np.unique(used)) >= 2, used


def test_cached_decoding_with_injection_and_gate_exit_equals_full_forward():
  cfg, model, params, toks = _gate_model(exit_signal="gate")  # the configured rule exits on the gate
  _, aux = jitted_apply(model)(params, toks)
  tau = ref.gap_thresholds(np.asarray(aux["exit_signal"][0]))[0]
  want, aux = jitted_apply(model)(params, toks, tau)
  got, cycles = decode_teacher_forced(model, params, toks, tau, "state", 1)
  np.testing.assert_array_equal(cycles, np.asarray(aux["cycles_used"]))
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-5)
  assert len(np.unique(cycles)) >= 2


def test_gate_config_errors_name_the_fix():
  with pytest.raises(ConfigError, match="exit_gate=True"):
    tiny_cfg(exit_signal="gate")
  with pytest.raises(ConfigError, match="zero_bias=True"):
    tiny_cfg(zero_bias_init=-3.0)
  plain, plain_params = init_params(tiny_cfg())
  with pytest.raises(ConfigError, match="exit_gate"):
    plain.apply({"params": plain_params}, tokens(plain.cfg), ExitRule(signal="gate", threshold=0.5))


# ------------------------------------------------------------------ all of them through the trainer

# Two cycles keep it to two train programs (C = 1, 2) and two fixed cuts in the sweep; the train
# runs skip evaluation (the sweep evaluates), since compiles are what this test costs.
RECIPES = {"train.cycles_distribution": "poisson", "train.cycles_mean": 1.5, "model.backprop_cycles": 1,
           "model.input_injection": "head", "model.exit_gate": True, "model.exit_signal": "gate",
           "model.zero_bias": True, "model.zero_bias_init": -3.0, "model.num_cycles": 2,
           "model.zero_attention_target_weight": 0.5,
           "train.steps": 6, "checkpoint.every_steps": 3, "eval.max_batches": 0, "log.tensorboard": False}


def test_recipes_train_resume_exactly_and_sweep_with_the_gate(tmp_path):
  cd = load_config("tiny")
  for dotted, value in RECIPES.items():
    section, field = dotted.split(".")
    cd[section][field] = value
  cfg = config_lib.parse(cd)
  counts = [sampled_cycles(cfg, s) for s in range(1, 7)]
  assert len(set(counts[:3])) >= 2 and len(set(counts[3:])) >= 2, counts  # several programs each run
  straight = tmp_path / "straight"
  trainer.train(cfg, str(straight))
  rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r for r in rows if "train/loss" in r}
  assert [logged[s]["train/num_cycles"] for s in range(1, 7)] == counts
  assert all(np.isfinite(logged[s]["train/gate_kl"]) and logged[s]["train/zero_attention_target_loss"] > 0
             for s in logged)
  # Resume from step 3: steps 4..6 draw the same counts and give bit-equal losses.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 3))
  trainer.train(cfg, str(resumed))
  want, got = losses(straight), losses(resumed)
  assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]
  # The sweep has a rule for the gate and for every other signal.
  sweep = evaluator.sweep(restore.load_trained(str(straight)), num_thresholds=2, max_batches=1)
  assert {p["rule"] for p in sweep["points"]} == {"fixed", *EXIT_SIGNALS}
  gate = [p for p in sweep["points"] if p["rule"] == "gate"]
  assert all(0 <= p["accuracy"] <= 1 and 1 <= p["mean_cycles"] <= 2 for p in gate)
