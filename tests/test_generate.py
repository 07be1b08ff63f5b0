"""Cached decoding against the full-sequence forward pass, generation, sampling filters, input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_numpy_ref import gap_thresholds
from model_testutil import init_params, jitted_apply, tiny_cfg, tokens
from ztt_jax import decoding
from ztt_jax.decoding import Sampling
from ztt_jax.errors import ConfigError
from ztt_jax.model import ExitRule

B, T, P = 2, 8, 3  # prompt P, then T - P positions decoded one token per step

# rope + zero keys in head and tail + zero bias: every cache and position path of a ZTT.
ZTT = dict(zero_token_layers="all", zero_bias=True)


@pytest.fixture(scope="module")
def ztt():
  cfg = tiny_cfg(**ZTT)
  model, params = init_params(cfg, B, T)
  toks = tokens(cfg, B, T)
  _, aux = jitted_apply(model)(params, toks)
  # A threshold in a wide gap of the first cycle's signal: tokens exit after different cycles, and
  # rounding differences between the two paths cannot flip a decision.
  tau = gap_thresholds(np.asarray(aux["zero_attention"][0]))[0]
  return model, params, toks, tau


def decode_teacher_forced(model, params, toks, tau, frozen_kv, prefill, num_cycles=None):
  """Prefill `prefill` tokens, then feed the rest one per step; logits and cycles of every position."""
  rule = ExitRule.from_config(model.cfg, threshold=tau, frozen_kv=frozen_kv)
  cache = decoding.init_cache(model.cfg, toks.shape[0], toks.shape[1], num_cycles)
  logits, cache, aux = decoding.forward_cached_jit(model, params, toks[:, :prefill], cache, 0, rule)
  all_logits, all_cycles = [logits], [aux["cycles_used"]]
  for p in range(prefill, toks.shape[1]):
    logits, cache, aux = decoding.forward_cached_jit(model, params, toks[:, p:p + 1], cache, p, rule)
    all_logits.append(logits)
    all_cycles.append(aux["cycles_used"])
  return np.asarray(jnp.concatenate(all_logits, 1)), np.asarray(jnp.concatenate(all_cycles, 1))


# Each (exit, frozen_kv) is its own pair of programs; only one case pays for a multi-token prefill
# program, the others prefill one token (the decoding step's own program). Compiles dominate here.
@pytest.mark.parametrize("exit_on,frozen_kv,prefill", [(False, "state", 1), (True, "state", P), (True, "stack", 1)])
def test_cached_decoding_matches_full_forward(ztt, exit_on, frozen_kv, prefill):
  model, params, toks, tau = ztt
  tau = tau if exit_on else None
  ref, aux = jitted_apply(model, frozen_kv=frozen_kv)(params, toks, tau)
  got, cycles = decode_teacher_forced(model, params, toks, tau, frozen_kv, prefill)
  ref_cycles = np.asarray(aux["cycles_used"])
  np.testing.assert_array_equal(cycles, ref_cycles)
  np.testing.assert_allclose(got, np.asarray(ref), atol=2e-5, rtol=1e-5)
  if not exit_on:
    assert (ref_cycles == model.cfg.cycles).all()
    return
  assert len(np.unique(ref_cycles)) >= 2 and ref_cycles.min() < model.cfg.cycles, ref_cycles  # exits differ
  if frozen_kv == "state":
    # The two freeze semantics really differ here (the stack has 2 layers), so this comparison
    # would catch a decoder that filled the cache the other way.
    other, _ = jitted_apply(model, frozen_kv="stack")(params, toks, tau)
    assert np.max(np.abs(np.asarray(other) - np.asarray(ref))) > 1e-3


@pytest.mark.parametrize("exit_on,prefill", [(False, 2), (True, 5)])
def test_windowed_cached_decoding_keeps_a_ring_and_matches_full_forward(exit_on, prefill):
  """model.attention_window=3: the cache is a ring of 3 entries per layer; a prefill shorter than
  the window (empty slots) and one longer (only its last 3 kept), then one token per step, with
  per-token exit (frozen_kv='state': frozen tokens' later-cycle K/V written into the ring)."""
  cfg = tiny_cfg(**ZTT, attention_window=3, token_shift=True)
  model, params = init_params(cfg, B, 11)
  toks = tokens(cfg, B, 11, seed=1)
  _, aux = jitted_apply(model)(params, toks)
  tau = gap_thresholds(np.asarray(aux["zero_attention"][0]))[0] if exit_on else None
  ref, aux = jitted_apply(model)(params, toks, tau)
  assert decoding.init_cache(cfg, B, 11)["middle"]["k"].shape[3] == 3
  got, cycles = decode_teacher_forced(model, params, toks, tau, "state", prefill)
  np.testing.assert_array_equal(cycles, np.asarray(aux["cycles_used"]))
  np.testing.assert_allclose(got, np.asarray(ref), atol=2e-5, rtol=1e-5)
  if exit_on:
    assert len(np.unique(cycles)) >= 2, cycles


def test_cached_decoding_runs_more_cycles_than_the_pool_holds(ztt):
  # Cycles beyond the pool reuse its last row, in decoding as in the full forward.
  model, params, toks, tau = ztt
  C = model.cfg.cycles + 2
  ref, aux = jitted_apply(model, num_cycles=C)(params, toks, tau)
  got, cycles = decode_teacher_forced(model, params, toks, tau, "state", 1, num_cycles=C)
  ref_cycles = np.asarray(aux["cycles_used"])
  np.testing.assert_array_equal(cycles, ref_cycles)
  np.testing.assert_allclose(got, np.asarray(ref), atol=2e-5, rtol=1e-5)
  assert ref_cycles.max() > model.cfg.cycles and len(np.unique(ref_cycles)) >= 2, ref_cycles


def test_greedy_generation_with_exit_is_deterministic_and_is_the_argmax_of_the_full_forward(ztt):
  model, params, toks, tau = ztt
  n = T - P + 1
  rule = ExitRule.from_config(model.cfg, threshold=tau)
  runs = [decoding.generate(model, params, np.asarray(toks[:, :P]), max_new_tokens=n,
                            sampling=Sampling(temperature=0.0, seed=seed), rule=rule) for seed in (0, 1)]
  np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
  assert runs[0].num_new == n
  # Greedy token i is the argmax of the full forward at position P-1+i over prompt + tokens < i.
  seq = jnp.concatenate([toks[:, :P], jnp.asarray(runs[0].tokens[:, :-1])], axis=1)
  ref, aux = jitted_apply(model, frozen_kv="state")(params, seq, tau)
  np.testing.assert_array_equal(runs[0].tokens, np.argmax(np.asarray(ref)[:, P - 1:], -1))
  # step_cycles[i] is the cycle count of the position that produced token i.
  np.testing.assert_array_equal(runs[0].step_cycles, np.asarray(aux["cycles_used"])[:, P - 1:])


def test_sampling_filters():
  V, N = 16, 2000
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(N, V)) * 2.0, jnp.float32)
  rank = np.argsort(np.argsort(-np.asarray(logits), -1), -1)  # 0 = largest
  sample = jax.jit(decoding.sample_logits)
  rng = jax.random.key(0)
  got = np.asarray(sample(rng, logits, 1.0, 3, 1.0))
  r = rank[np.arange(N), got]
  assert r.max() <= 2 and len(np.unique(r)) == 3  # only the top 3 ever, and all of them
  np.testing.assert_array_equal(np.asarray(sample(rng, logits, 0.0, 3, 1.0)), np.argmax(logits, -1))
  np.testing.assert_array_equal(np.asarray(sample(rng, logits, 1.0, 0, 1e-6)), np.argmax(logits, -1))
  # top_p keeps the smallest prefix of the sorted distribution whose mass reaches p.
  probs = np.asarray(jax.nn.softmax(logits, -1))
  sorted_p = -np.sort(-probs, -1)
  keep = (np.cumsum(sorted_p, -1) - sorted_p) < 0.5
  got = np.asarray(sample(rng, logits, 1.0, 0, 0.5))
  assert (rank[np.arange(N), got] < keep.sum(-1)).all()
  unfiltered = np.asarray(sample(rng, logits, 1.0, 0, 1.0))
  assert len(np.unique(rank[np.arange(N), unfiltered])) > 8


def test_bad_inputs_name_the_fix(ztt):
  model, params, _, _ = ztt
  cfg = model.cfg
  ok = np.zeros((1, 2), np.int32)
  cases = [
      (dict(prompt_BxP=np.zeros((1, cfg.max_seq_len), np.int32), max_new_tokens=1), "shorten the prompt"),
      (dict(prompt_BxP=ok, max_new_tokens=cfg.max_seq_len), "lower --max_new_tokens"),
      (dict(prompt_BxP=np.array([[1, cfg.vocab_size]]), max_new_tokens=1), "outside the model vocabulary"),
      (dict(prompt_BxP=ok, max_new_tokens=0), "max_new_tokens=0"),
      (dict(prompt_BxP=ok, max_new_tokens=1, sampling=Sampling(temperature=-1.0)), "temperature"),
      (dict(prompt_BxP=ok, max_new_tokens=1, sampling=Sampling(top_k=-2)), "top_k"),
      (dict(prompt_BxP=ok, max_new_tokens=1, sampling=Sampling(top_p=0.0)), "top_p"),
      (dict(prompt_BxP=ok, max_new_tokens=1, rule=lambda: ExitRule.from_config(cfg, frozen_kv="bogus")), "frozen_kv"),
  ]
  for kw, words in cases:
    with pytest.raises(ConfigError, match=words):
      kw = {k: v() if callable(v) else v for k, v in kw.items()}  # a bad rule fails as it is built
      decoding.generate(model, params, **kw)
  vanilla = tiny_cfg(variant="vanilla")
  vmodel, vparams = init_params(vanilla, 1, 2)
  with pytest.raises(ConfigError, match="no zero token"):
    decoding.generate(vmodel, vparams, ok, max_new_tokens=1, rule=ExitRule(threshold=0.5))
