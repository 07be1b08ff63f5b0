"""Zero-slot attention against an independent numpy attention with an extra zero-value column."""
import numpy as np
import jax.numpy as jnp

from model_numpy_ref import attention as np_attention
from ztt_jax.model.attention import zero_slot_attention


def _qkvz(seed=0, B=2, T=6, H=3, K=8):
  r = np.random.default_rng(seed)
  q, k, v = (r.normal(size=(B, T, H, K)) for _ in range(3))
  z = 2.0 * r.normal(size=(H, K))
  return q, k, v, z


def test_zero_slot_matches_numpy_with_zero_value_column():
  q, k, v, z = _qkvz()
  zb = np.array([0.5, -1.0, 0.0])
  out, a0 = zero_slot_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, z)), jnp.asarray(zb))
  for b in range(q.shape[0]):
    ref_out, ref_a0 = np_attention(q[b], k[b], v[b], z, zb)
    np.testing.assert_allclose(np.asarray(out[b]), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a0[b]), ref_a0, rtol=1e-5, atol=1e-6)
  assert float(a0.max()) > 0.3 and float(a0.std()) > 0.05  # the slot takes real, varied weight


def test_output_is_one_minus_a0_times_ordinary_attention():
  q, k, v, z = _qkvz(seed=1)
  out, a0 = zero_slot_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, z)))
  for b in range(q.shape[0]):
    plain, _ = np_attention(q[b], k[b], v[b])  # no zero slot
    scale_TxHx1 = (1.0 - np.asarray(a0[b])).T[..., None]
    np.testing.assert_allclose(np.asarray(out[b]), scale_TxHx1 * plain, rtol=1e-5, atol=1e-5)


def test_masked_zero_slot_is_bitwise_plain_attention():
  q, k, v, z = (jnp.asarray(a, jnp.float32) for a in _qkvz(seed=2))
  masked, a0 = zero_slot_attention(q, k, v, z, None, jnp.asarray(True))
  plain, a0_plain = zero_slot_attention(q, k, v)
  np.testing.assert_array_equal(np.asarray(masked), np.asarray(plain))
  assert float(jnp.abs(a0).max()) == 0.0 and float(jnp.abs(a0_plain).max()) == 0.0
  for b in range(q.shape[0]):
    ref, _ = np_attention(*(np.asarray(a[b], np.float64) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(plain[b]), ref, rtol=1e-5, atol=1e-5)
