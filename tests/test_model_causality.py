"""Changing tokens after position t changes nothing at positions <= t, for every variant, with and
without per-token exit."""
import numpy as np
import pytest

from model_testutil import apply, init_params, tiny_cfg, tokens

B, T = 2, 8


@pytest.mark.parametrize("variant", ["vanilla", "bc", "htc", "ztt"])
def test_future_tokens_do_not_leak(variant):
  cfg = tiny_cfg(variant=variant, num_cycles=3)
  model, params = init_params(cfg, B, T, seed=5)
  signal = "zero_attention" if cfg.use_zero_token else "confidence"
  toks = tokens(cfg, B, T, seed=5)
  _, aux = apply(model, params, toks, None, signal=signal)
  tau = float(np.median(np.asarray(aux["exit_signal"])))
  for exit_threshold in (None, tau):
    logits, aux = apply(model, params, toks, exit_threshold, signal=signal)
    used = np.asarray(aux["cycles_used"])
    if exit_threshold is not None and cfg.cycles > 1:
      assert len(np.unique(used)) >= 2  # the exit really is per token here
    for t in (0, 3, 6):
      changed = toks.at[:, t + 1:].set((toks[:, t + 1:] + 1 + np.arange(T - t - 1)) % cfg.vocab_size)
      logits2, aux2 = apply(model, params, changed, exit_threshold, signal=signal)
      np.testing.assert_allclose(np.asarray(logits2[:, :t + 1]), np.asarray(logits[:, :t + 1]), rtol=0, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(aux2["cycles_used"][:, :t + 1]), used[:, :t + 1])
      np.testing.assert_allclose(np.asarray(aux2["exit_signal"][:, :, :t + 1]),
                                 np.asarray(aux["exit_signal"][:, :, :t + 1]), rtol=0, atol=1e-6)
      assert np.abs(np.asarray(logits2[:, t + 1]) - np.asarray(logits[:, t + 1])).max() > 1e-3
