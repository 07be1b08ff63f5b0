"""The exit signals built on a0 and on the state (issue 19: raw a0 fires backwards on a windowed
task): zero_attention_last, zero_attention_delta, state_delta, each against plain numpy with exit
off and against a Python loop that freezes exited tokens; cached decoding; and a0 trained against
"this cycle's read-out is right" (model.zero_attention_target_weight)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_numpy_ref as ref
from model_testutil import apply, init_params, jitted_apply, tiny_cfg, tokens
from test_generate import decode_teacher_forced
from ztt_jax.errors import ConfigError
from ztt_jax.model import ExitRule
from ztt_jax.train_step import weighted_loss_sums

B, T = 3, 6
NEW_SIGNALS = ("zero_attention_last", "zero_attention_delta", "state_delta")


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_cfg(num_cycles=4, n_tail_layers=0)
  model, params = init_params(cfg, B, T, seed=3)
  return cfg, model, params, tokens(cfg, B, T, seed=3), ref.to_np(params)


def _signal(name, a0_SxBxT, x_prev, x_new, za_prev, c):
  """One cycle's signal, written out from its definition (float64)."""
  za = a0_SxBxT.mean(0)
  if name == "zero_attention_last":
    return a0_SxBxT[-1]
  if name == "zero_attention_delta":
    return np.zeros_like(za) if c == 0 else 1.0 - np.abs(za - za_prev)
  if name == "state_delta":
    step = np.linalg.norm(x_new - x_prev, axis=-1)
    return np.maximum(1.0 - step / (np.linalg.norm(x_prev, axis=-1) + 1e-6), 0.0)
  return za


def reference(cfg, p, toks, signal, tau=None, min_cycles=1):
  """Per-token exit in a plain loop over cycles, frozen_kv='state': an exited token enters every
  layer with its frozen state. Returns logits, signals [C,B,T] (0 once exited), cycles used."""
  x = p["embed"]["embedding"][np.asarray(toks)]
  x, _ = ref.stack(p["head"], x, cfg, cfg.unique_head_layers)
  exited = np.zeros(toks.shape, bool)
  used = np.zeros(toks.shape, np.int32)
  za_prev = np.zeros(toks.shape)
  signals = []
  for c in range(cfg.cycles):
    frozen = (exited, x) if tau is not None else None
    new_x, a0 = ref.stack(p["middle"], x, cfg, cfg.stack_layers, p["zero_key_pool"][c], None, False, frozen)
    s = _signal(signal, a0, x, new_x, za_prev, c)
    ran = ~exited
    za_prev = np.where(ran, a0.mean(0), za_prev)
    x = np.where(exited[..., None], x, new_x)
    used += ran
    if tau is not None and c + 1 >= min_cycles:
      exited = exited | (s >= tau)
    signals.append(np.where(ran, s, 0.0))
  return ref.readout(p, x, cfg), np.stack(signals), used


@pytest.mark.parametrize("signal", NEW_SIGNALS)
def test_signal_without_exit_is_its_definition(setup, signal):
  cfg, model, params, toks, p = setup
  _, aux = apply(model, params, toks, None, signal=signal)
  got = np.asarray(aux["exit_signal"])
  _, want, _ = reference(cfg, p, toks, signal)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
  if signal == "zero_attention_delta":
    # ... which is also what the model's own per-cycle mean a0 gives
    za = np.asarray(aux["zero_attention"], np.float64)
    np.testing.assert_allclose(got[1:], 1.0 - np.abs(np.diff(za, axis=0)), atol=1e-6)
    assert not got[0].any()
  else:
    assert len(np.unique(got)) > cfg.cycles  # not a constant per cycle


@pytest.mark.parametrize("signal,min_cycles", [("zero_attention_last", 1), ("zero_attention_delta", 2),
                                               ("state_delta", 1)])
def test_exit_on_signal_matches_reference_loop(setup, signal, min_cycles):
  cfg, model, params, toks, p = setup
  sig = reference(cfg, p, toks, signal)[1][max(min_cycles - 1, 1 if signal == "zero_attention_delta" else 0):-1]
  for tau in ref.gap_thresholds(sig):
    want_logits, want_sig, want_used = reference(cfg, p, toks, signal, tau, min_cycles)
    if np.abs(want_sig[want_sig > 0] - tau).min() > 1e-4 and len(np.unique(want_used)) >= 2:
      break
  else:
    raise AssertionError("no threshold far from every signal value that splits the tokens")
  logits, aux = apply(model, params, toks, tau, signal=signal, min_cycles=min_cycles)
  np.testing.assert_array_equal(np.asarray(aux["cycles_used"]), want_used)
  np.testing.assert_allclose(np.asarray(aux["exit_signal"]), want_sig, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)
  assert want_used.min() >= min_cycles and want_used.min() < cfg.cycles


def test_cached_decoding_with_a_delta_signal_equals_full_forward():
  """zero_attention_delta carries the previous cycle's a0 in the cycle state, token by token."""
  cfg = tiny_cfg(exit_signal="zero_attention_delta", zero_token_layers="all")
  model, params = init_params(cfg, 2, 8)
  toks = tokens(cfg, 2, 8)
  tau = ref.gap_thresholds(reference(cfg, ref.to_np(params), toks, cfg.exit_signal)[1][1])[0]
  want, aux = jitted_apply(model)(params, toks, tau)
  got, cycles = decode_teacher_forced(model, params, toks, tau, "state", 1)
  np.testing.assert_array_equal(cycles, np.asarray(aux["cycles_used"]))
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-5)
  assert len(np.unique(cycles)) >= 2 and cycles.min() >= 2  # the first cycle's signal is 0


def test_zero_attention_target_loss_is_the_bce_and_trains_the_zero_keys():
  cfg = tiny_cfg(zero_attention_target_weight=0.7, zero_attention_target_smoothing=0.25, remat_policy="none")
  model, params = init_params(cfg, 2, 8)
  toks = tokens(cfg, 2, 8)
  p = ref.to_np(params)
  _, za, _, states = ref.forward(p, np.asarray(toks), cfg)  # the model's a0 and states, in numpy
  cyc = np.stack([ref.readout(p, x, cfg) for x in states])
  # targets: what the last cycle reads out for about half the tokens, so both classes of the BCE occur
  targets = np.where(np.random.default_rng(1).uniform(size=toks.shape) < 0.5, cyc[-1].argmax(-1),
                     np.asarray(tokens(cfg, 2, 8, seed=4)))
  w = np.random.default_rng(2).uniform(size=toks.shape)
  batch = {"inputs": toks, "targets": jnp.asarray(targets, jnp.int32), "weights": jnp.asarray(w, jnp.float32)}
  right = (cyc.argmax(-1) == targets[None]).astype(np.float64)
  assert 0 < right.mean() < 1
  a = 1e-6 + (1 - 2e-6) * za
  label = np.where(right == 1, 0.75, 0.25)  # smoothing 0.25
  bce = -(label * np.log(a) + (1 - label) * np.log(1 - a))
  want = np.mean(np.sum(bce * w, axis=(1, 2)))

  def target_sum(pr):
    loss_sum, stats = weighted_loss_sums(model, pr, batch, 0.0)
    return stats["zero_attention_target_sum"], (loss_sum, stats)

  (got, (loss_sum, stats)), grads = jax.jit(jax.value_and_grad(target_sum, has_aux=True))(params)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss_sum - stats["ce_sum"]), 0.7 * want, rtol=1e-5)
  g = np.asarray(grads["zero_key_pool"])
  assert np.isfinite(g).all() and (np.abs(g).reshape(cfg.cycles, -1).max(1) > 1e-6).all()  # every cycle's row


def test_signal_config_errors_name_the_fix():
  with pytest.raises(ConfigError, match="variant=ztt"):
    tiny_cfg(variant="htc", zero_attention_target_weight=0.5)
  with pytest.raises(ConfigError, match=">= 0"):
    tiny_cfg(zero_attention_target_weight=-1.0)
  with pytest.raises(ConfigError, match=r"zero_attention_target_smoothing.*\[0, 0.5\)"):
    tiny_cfg(zero_attention_target_weight=1.0, zero_attention_target_smoothing=0.5)
  with pytest.raises(ConfigError, match="exit_threshold=none"):
    tiny_cfg(variant="htc", exit_signal="zero_attention_last", exit_threshold=0.5)
  tiny_cfg(variant="htc", exit_signal="state_delta", exit_threshold=0.5)  # needs no zero token
  model, params = init_params(tiny_cfg(variant="htc"))
  with pytest.raises(ConfigError, match="state_delta"):
    model.apply({"params": params}, tokens(model.cfg), ExitRule(signal="zero_attention_delta", threshold=0.5))
