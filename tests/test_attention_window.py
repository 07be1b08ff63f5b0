"""model.attention_window: the sliding causal window against the numpy reference, and its receptive
field: information moves at most w-1 positions per attention layer, so the reach is exactly
(attention layers applied) * (w-1) (+1 with token_shift)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_numpy_ref as ref
from model_testutil import apply, init_params, tiny_cfg, tokens
from ztt_jax.errors import ConfigError
from ztt_jax.model import attention_impls as ai
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


@functools.lru_cache(maxsize=None)
def _windowed(impl, block, window, with_positions):
  """jit of (out, a0, grads w.r.t. q, k, v, zero key, zero bias of a loss on out and a0)."""
  def f(args, weights, pos):
    def loss(*a):
      out, a0 = ai.attention(impl, *a, q_positions_T=pos if with_positions else None, block_size=block,
                             window=window)
      return jnp.sum(out * weights[0]) + jnp.sum(a0 * weights[1]), (out, a0)
    (_, (out, a0)), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(*args)
    return out, a0, grads
  return jax.jit(f)


# (T, S, block, window, positions): T not a multiple of the block, windows smaller and larger than
# the block, and a decoding prefill against a longer cache.
@pytest.mark.parametrize("T,S,block,window,positions", [
    (21, 21, 4, 3, None),
    (21, 21, 4, 9, None),
    (5, 21, 4, 6, "decode"),
])
def test_chunked_matches_reference_with_a_window(T, S, block, window, positions):
  r = np.random.default_rng(T + window)
  H, K = 2, 4
  args = tuple(jnp.asarray(r.normal(size=shape), jnp.float32) for shape in
               ((2, T, H, K), (2, S, H, K), (2, S, H, K), (H, K), (H,)))
  args = args[:3] + (2 * args[3],) + args[4:]
  weights = (jnp.asarray(r.normal(size=(2, T, H, K)), jnp.float32), jnp.asarray(r.normal(size=(2, H, T)), jnp.float32))
  pos = jnp.arange(T, dtype=jnp.int32) + 7
  ref = _windowed("reference", block, window, positions is not None)(args, weights, pos)
  got = _windowed("chunked", block, window, positions is not None)(args, weights, pos)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), atol=1e-6, rtol=0)
  for name, g, gr in zip(("q", "k", "v", "zero_key", "zero_bias"), got[2], ref[2]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=1e-4, rtol=0, err_msg=f"d{name}")
    assert float(jnp.abs(gr).max()) > 1e-3, name


def test_chunked_skips_the_key_blocks_outside_the_window(monkeypatch):
  """Counted eagerly (the loops run in Python): forward and backward each compute scores for about
  (T / block) * (window / block + 1) block pairs, not the causal (T / block)^2 / 2."""
  from ztt_jax.model.attention_impls import chunked
  calls = []
  scores = chunked._scores
  monkeypatch.setattr(chunked, "_scores", lambda *a: calls.append(1) or scores(*a))
  T, block, window = 24, 8, 5
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=(1, T, 1, 4)), jnp.float32) for _ in range(3))
  zk = jnp.asarray(r.normal(size=(1, 4)), jnp.float32)
  loss = lambda q, k, v: jnp.sum(chunked.chunked_attention(q, k, v, zk, block_size=block, window=window)[0])
  with jax.disable_jit():
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  n = T // block
  assert len(calls) == 2 * (2 * n - 1)  # each query block sees its own key block and the one before
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_fused_local_window_without_a_zero_slot(monkeypatch):
  """cudnn's path (jax.nn.dot_product_attention's local window, run here by its XLA twin) in layers
  without a zero slot; with one, and on the Pallas kernel, the window falls back to chunked."""
  r = np.random.default_rng(1)
  q, k, v = (jnp.asarray(r.normal(size=(2, 11, 2, 8)), jnp.float32) for _ in range(3))
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0]))
  got = jax.jit(jax.grad(loss(functools.partial(ai.fused_attention, ai.xla_kernel, window=3)),
                         argnums=(0, 1, 2)))(q, k, v)
  ref = jax.jit(jax.grad(loss(functools.partial(ai.attention, "reference", window=3)), argnums=(0, 1, 2)))(q, k, v)
  for g, gr in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=1e-5)
  with pytest.raises(ValueError, match="chunked"):
    ai.fused_attention(ai.xla_kernel, q, k, v, q[0, 0], window=3)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert ai.resolve("auto", seq_len=64, dtype=jnp.bfloat16, head_dim=32, window=4) == "chunked"
  assert ai.resolve("auto", seq_len=64, dtype=jnp.bfloat16, head_dim=32) == "pallas"
  with pytest.raises(ConfigError, match="'pallas' has no sliding-window mask.*use model.attention_impl=auto"):
    ai.resolve("pallas", seq_len=64, dtype=jnp.bfloat16, head_dim=32, window=4)
