"""model.attention_window: the sliding causal window against the numpy reference, and its receptive
field: information moves at most w-1 positions per attention layer, so the reach is exactly
(attention layers applied) * (w-1) (+1 with token_shift)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_numpy_ref as ref
from model_testutil import apply, init_params, tiny_cfg, tokens
from ztt_jax.errors import ConfigError
from ztt_jax.model.attention import zero_slot_attention


def test_windowed_attention_matches_numpy():
  r = np.random.default_rng(0)
  B, T, H, K, w = 2, 9, 2, 8, 3
  q, k, v = (r.normal(size=(B, T, H, K)) for _ in range(3))
  z, zb = 2.0 * r.normal(size=(H, K)), np.array([0.5, -1.0])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out, a0 = zero_slot_attention(f32(q), f32(k), f32(v), f32(z), f32(zb), window=w)
  # Decoding's form: the last 4 queries against the 9 keys, by position.
  out_d, a0_d = zero_slot_attention(f32(q[:, 5:]), f32(k), f32(v), f32(z), f32(zb), window=w,
                                    q_positions_T=jnp.arange(5, 9))
  for b in range(B):
    want, want_a0 = ref.attention(q[b], k[b], v[b], z, zb, window=w)
    np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a0[b]), want_a0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_d[b]), want[5:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a0_d[b]), want_a0[:, 5:], rtol=1e-5, atol=1e-6)
  full, _ = zero_slot_attention(f32(q), f32(k), f32(v), f32(z), f32(zb))
  wide, _ = zero_slot_attention(f32(q), f32(k), f32(v), f32(z), f32(zb), window=T)
  np.testing.assert_array_equal(np.asarray(wide), np.asarray(full))
  assert np.abs(np.asarray(out) - np.asarray(full)).max() > 1e-2


@pytest.mark.parametrize("variant", ["ztt", "vanilla"])
def test_model_matches_numpy_reference_with_a_window(variant):
  cfg = tiny_cfg(variant=variant, attention_window=3)
  model, params = init_params(cfg, T=11)
  toks = tokens(cfg, T=11)
  logits, aux = apply(model, params, toks)
  want, sig, _, _ = ref.forward(ref.to_np(params), np.asarray(toks), cfg)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["zero_attention"]), sig, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, token_shift", [("ztt", True), ("vanilla", False)])
def test_receptive_field_is_exactly_the_reach(variant, token_shift):
  w, T = 2, 14
  cfg = tiny_cfg(variant=variant, attention_window=w, token_shift=token_shift, n_head_layers=1,
                 n_middle_layers=2, n_tail_layers=1, num_cycles=3, max_seq_len=T)
  layers = cfg.effective_depth  # ztt: 1 + 2*3 + 1 = 8; vanilla: 4
  reach = layers * (w - 1) + int(token_shift)
  model, params = init_params(cfg, T=T, seed=3)
  # Stronger values and outputs: at init scale the effect at the edge of the reach (~1e-6) is
  # float32 noise; here it is > 1e-4.
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: 3 * a if path[-1].key in ("v_kernel", "o_kernel") else a, params)
  toks = tokens(cfg, T=T, seed=3)
  logits = np.asarray(apply(model, params, toks)[0])
  for j in (0, 2):
    changed = toks.at[:, j].set((toks[:, j] + 1) % cfg.vocab_size)
    diff_T = np.abs(np.asarray(apply(model, params, changed)[0]) - logits).max(axis=(0, 2))
    assert np.all(diff_T[:j] == 0)
    assert np.all(diff_T[j:j + reach + 1] > 1e-5), (j, reach, diff_T)
    assert np.all(diff_T[j + reach + 1:] == 0), (j, reach, diff_T)
    assert j + reach + 1 < T


def test_window_validation_names_the_fix():
  for bad in (0, -2, 2.5, True, "4"):
    with pytest.raises(ConfigError, match=r"model.attention_window=.*integer >= 1.*none"):
      tiny_cfg(attention_window=bad)
  assert tiny_cfg(attention_window=1).attention_window == 1
