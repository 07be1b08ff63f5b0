"""Early exit: freezing, cycles_used, granularity, the real-skip path, the confidence signal."""
import jax
import numpy as np
import pytest

import model_numpy_ref as ref
from model_testutil import apply, init_params, tiny_cfg, tokens
from ztt_jax.errors import ConfigError
from ztt_jax.model import ExitRule

B, T = 3, 6


def _setup(**kw):
  # no tail: the read-out is per token, so a frozen state gives frozen per-cycle logits
  cfg = tiny_cfg(num_cycles=4, n_tail_layers=0, cycle_loss_weight=0.5, **kw)
  model, params = init_params(cfg, B, T, seed=3)
  return cfg, model, params, tokens(cfg, B, T, seed=3), ref.to_np(params)


def _tau_and_reference(cfg, p, toks, min_cycles, granularity="token", signal="zero_attention"):
  _, sig, _, _ = ref.forward(p, np.asarray(toks), cfg, signal=signal)
  sig = sig[min_cycles - 1:]
  for tau in ref.gap_thresholds(sig.mean(-1) if granularity == "sequence" else sig)[:10]:
    out = ref.forward(p, np.asarray(toks), cfg, tau=tau, min_cycles=min_cycles, granularity=granularity,
                      signal=signal)
    s = out[1][min_cycles - 1:]
    s = s.mean(-1) if granularity == "sequence" else s[s > 0]
    if np.abs(s - tau).min() > 1e-4:
      return tau, out
  raise AssertionError("no threshold far enough from every signal value for a float32 check")


@pytest.mark.parametrize("min_cycles", [1, 2])
def test_token_exit_matches_reference_loop_and_freezes_state(min_cycles):
  cfg, model, params, toks, p = _setup()
  tau, (want_logits, want_sig, want_used, _) = _tau_and_reference(cfg, p, toks, min_cycles)
  logits, aux = apply(model, params, toks, tau, min_cycles=min_cycles)
  used = np.asarray(aux["cycles_used"])
  np.testing.assert_array_equal(used, want_used)
  assert used.min() >= min_cycles and len(np.unique(used)) >= 2 and used.min() < cfg.cycles
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["zero_attention"]), want_sig, rtol=1e-4, atol=1e-5)
  # an exited token's state (seen through the per-token read-out) is its state at the exit cycle
  cyc = np.asarray(aux["cycle_logits"])
  for b in range(B):
    for t in range(T):
      u = used[b, t]
      for c in range(u, cfg.cycles):
        np.testing.assert_array_equal(cyc[c, b, t], cyc[u - 1, b, t])
      np.testing.assert_array_equal(np.asarray(logits)[b, t], cyc[u - 1, b, t])
      if u > 1:
        assert np.abs(cyc[u - 1, b, t] - cyc[u - 2, b, t]).max() > 1e-4  # it did move before


def test_sequence_exit_matches_reference():
  cfg, model, params, toks, p = _setup()
  tau, (want_logits, _, want_used, _) = _tau_and_reference(cfg, p, toks, 1, granularity="sequence")
  logits, aux = apply(model, params, toks, tau, granularity="sequence")
  used = np.asarray(aux["cycles_used"])
  np.testing.assert_array_equal(used, want_used)
  assert (used == used[:, :1]).all() and len(np.unique(used)) >= 2
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)


def test_skip_path_equals_where_path_and_contains_cond():
  cfg, model, params, toks, p = _setup()
  partial_tau, _ = _tau_and_reference(cfg, p, toks, 1)
  for tau, all_used in ((-1.0, 1), (partial_tau, None), (2.0, cfg.cycles)):
    l0, a0 = apply(model, params, toks, tau)
    l1, a1 = apply(model, params, toks, tau, skip_exited=True)
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l0))
    np.testing.assert_array_equal(np.asarray(a1["cycles_used"]), np.asarray(a0["cycles_used"]))
    np.testing.assert_array_equal(np.asarray(a1["zero_attention"]), np.asarray(a0["zero_attention"]))
    if all_used is not None:
      assert (np.asarray(a1["cycles_used"]) == all_used).all()
  jaxpr = jax.make_jaxpr(lambda pr: model.apply({"params": pr}, toks, ExitRule(threshold=0.5, skip_exited=True)))(params)
  assert "cond[" in str(jaxpr)


def test_confidence_signal_exit_matches_reference():
  cfg, model, params, toks, p = _setup(variant="htc")
  _, aux = apply(model, params, toks, None, signal="confidence")
  cyc = np.asarray(aux["cycle_logits"], np.float64)
  e = np.exp(cyc - cyc.max(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(aux["exit_signal"]), (e / e.sum(-1, keepdims=True)).max(-1),
                             rtol=1e-5, atol=1e-6)
  assert not np.asarray(aux["zero_attention"]).any()  # no zero token in htc
  tau, (want_logits, want_sig, want_used, _) = _tau_and_reference(cfg, p, toks, 1, signal="confidence")
  logits, aux = apply(model, params, toks, tau, signal="confidence")
  np.testing.assert_array_equal(np.asarray(aux["cycles_used"]), want_used)
  assert len(np.unique(want_used)) >= 2
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["exit_signal"]), want_sig, rtol=1e-4, atol=1e-5)


def test_direct_cycle_readout_skips_the_tail_before_the_last_cycle_and_exits_like_the_reference():
  cfg = tiny_cfg(num_cycles=3, cycle_loss_weight=0.5, cycle_readout="direct", variant="htc")
  model, params = init_params(cfg, B, T, seed=5)
  toks, p = tokens(cfg, B, T, seed=5), ref.to_np(params)
  logits, aux = apply(model, params, toks, None)
  want_logits, _, _, states = ref.forward(p, np.asarray(toks), cfg)
  cyc = np.asarray(aux["cycle_logits"])
  for c in range(cfg.num_cycles - 1):  # early cycles: final norm + LM head on the state, no tail
    np.testing.assert_allclose(cyc[c], ref.readout(p, states[c], cfg, through_tail=False), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cyc[-1], want_logits, rtol=1e-4, atol=1e-4)  # the last goes through the tail
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)
  assert np.abs(cyc[0] - ref.readout(p, states[0], cfg)).max() > 1e-3  # the tail would change it
  tau, (want_logits, want_sig, want_used, _) = _tau_and_reference(cfg, p, toks, 1, signal="confidence")
  logits, aux = apply(model, params, toks, tau, signal="confidence")
  np.testing.assert_array_equal(np.asarray(aux["cycles_used"]), want_used)
  assert len(np.unique(want_used)) >= 2
  np.testing.assert_allclose(np.asarray(aux["exit_signal"]), want_sig, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)


def test_zero_attention_exit_needs_the_zero_token():
  cfg, model, params, toks, _ = _setup(variant="htc")
  with pytest.raises(ConfigError, match="confidence"):
    model.apply({"params": params}, toks, ExitRule(threshold=0.5))
