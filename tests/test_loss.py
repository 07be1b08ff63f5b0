"""The blockwise loss (ztt_jax/loss.py) against plain optax cross-entropy on materialised logits:
the per-token values, the training objective with every recipe that reads the cycles out (deep
supervision, the learned exit gate, the a0 target) and its gradient in every param, tied and untied
heads, per-token weights and padding, and the eval step's metrics; model.cycle_loss_every against a
plain loop over the cycles."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model_testutil import init_params, tiny_cfg
from ztt_jax.errors import ConfigError
from ztt_jax.loss import LMHead, head_logits, positions_per_block, token_losses
from ztt_jax.model import ZTTModel
from ztt_jax.model.exit import ExitRule, zero_attention_target_loss
from ztt_jax.model.lm import readout_cycles
from ztt_jax.train_step import gate_loss_sums, make_eval_step, weighted_loss_sums

B, T = 2, 7
BLOCK = 6  # 3 positions per block: 3 blocks, the last one padded


def test_positions_per_block():
  assert positions_per_block(2, 7, 32, BLOCK) == 3  # no divisor of 7 near 3: padded
  assert positions_per_block(8, 1024, 50304, 1024) == 128
  assert positions_per_block(8, 1000, 50304, 900) == 100  # a divisor close enough: no padding
  assert positions_per_block(4, 16, 32, 0) == 16  # a small vocabulary: one block
  assert positions_per_block(64, 16, 32, 8) == 1


# block 0 with these shapes: every logit fits one automatic block, so the whole-array path runs.
@pytest.mark.parametrize("vocab_axis, block", [(0, BLOCK), (1, BLOCK), (1, 0)])
def test_token_losses_match_optax_values_hits_and_gradients(vocab_axis, block):
  C, D, V = 3, 8, 11
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(C, B, T, D)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(V, D) if vocab_axis == 0 else (D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  g = jnp.asarray(rng.uniform(size=(C, B, T)), jnp.float32)  # any per-token cotangent

  def blockwise(h, kernel):
    ce, hit = token_losses(h, LMHead(kernel, vocab_axis), targets, block)
    return jnp.sum(ce * g), (ce, hit)

  def plain(h, kernel):
    logits = jax.vmap(head_logits, in_axes=(0, None))(h, LMHead(kernel, vocab_axis))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(targets, (C, B, T)))
    return jnp.sum(ce * g), (ce, jnp.argmax(logits, -1) == targets)

  (got, (ce, hit)), got_g = jax.jit(jax.value_and_grad(blockwise, (0, 1), has_aux=True))(h, kernel)
  (want, (ce_w, hit_w)), want_g = jax.value_and_grad(plain, (0, 1), has_aux=True)(h, kernel)
  np.testing.assert_allclose(np.asarray(ce), np.asarray(ce_w), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(hit), np.asarray(hit_w))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _plain_loss_sums(model, params, batch, cycle_loss_weight):
  """weighted_loss_sums as it was: optax on the materialised [C, B, T, V] logits."""
  cfg = model.cfg
  logits, aux = model.apply({"params": params}, batch["inputs"])
  w, t = batch["weights"], batch["targets"]
  loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * w)
  if "cycle_logits" in aux:
    cyc = aux["cycle_logits"]
    cce = optax.softmax_cross_entropy_with_integer_labels(cyc, jnp.broadcast_to(t, cyc.shape[:-1]))
    loss += cycle_loss_weight * jnp.mean(jnp.sum(cce * w, axis=(1, 2)))
    if cfg.exit_gate:
      loss += gate_loss_sums(cfg, aux["exit_gate"], cce, w)[0]
    if cfg.zero_attention_target_weight > 0:
      bce = zero_attention_target_loss(aux["zero_attention"], jnp.argmax(cyc, -1) == t,
                                       cfg.zero_attention_target_smoothing)
      loss += cfg.zero_attention_target_weight * jnp.mean(jnp.sum(bce * w, axis=(1, 2)))
  return loss


def _batch(cfg, seed=1):
  """Random targets (a 5-token vocabulary, so about one read-out in five is right and the a0 target
  sees both classes), random weights, and padding at the end of the second row (weight 0, target 0)."""
  rng = np.random.default_rng(seed)
  inputs, targets = (rng.integers(0, cfg.vocab_size, (B, T)) for _ in range(2))
  w = rng.uniform(0.2, 1.0, size=(B, T))
  targets[1, -2:], w[1, -2:] = 0, 0.0
  return {"inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
          "weights": jnp.asarray(w, jnp.float32)}


@pytest.fixture(scope="module")
def case():
  """Every recipe that reads each cycle out (deep supervision, the exit gate, the a0 target) through
  the tail (rematerialised per cycle under nothing_saveable), with the tied head; the untied layout
  is checked above."""
  cfg = tiny_cfg(max_seq_len=T, vocab_size=5, num_cycles=2, cycle_loss_weight=0.5, exit_gate=True,
                 zero_attention_target_weight=0.7, remat_policy="nothing_saveable")
  model, params = init_params(cfg, B, T)
  return model, params, _batch(cfg)


def test_objective_and_every_gradient_match_plain_cross_entropy(case):
  model, params, batch = case
  cw = model.cfg.cycle_loss_weight
  blockwise = jax.value_and_grad(lambda p: weighted_loss_sums(model, p, batch, cw, block_tokens=BLOCK)[0])
  plain = jax.value_and_grad(lambda p: _plain_loss_sums(model, p, batch, cw))
  (got, got_g), (want, want_g) = jax.jit(lambda p: (blockwise(p), plain(p)))(params)  # one compile
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  assert np.abs(np.asarray(got_g["embed"]["embedding"])).max() > 1e-3
  for path, a in jax.tree_util.tree_leaves_with_path(got_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(_at(want_g, path)), rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_eval_step_matches_plain_logits(case):
  """Per-token metrics under an exit rule: the eval step's blockwise values against argmax and optax
  on the logits the model returns."""
  model, params, batch = case
  rule = ExitRule.from_config(model.cfg, threshold=0.5)
  step = make_eval_step(model, block_tokens=BLOCK)
  got, (logits, aux) = jax.jit(lambda p, r: (step(p, batch, r), model.apply({"params": p}, batch["inputs"], r)))(
      params, rule)
  w = batch["weights"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  hit = np.asarray((jnp.argmax(logits, -1) == batch["targets"]) & (w > 0))
  assert 0 < hit.sum() < np.sum(np.asarray(w) > 0)
  np.testing.assert_allclose(np.asarray(got["ce_sum_B"]), np.asarray(jnp.sum(ce * w, 1)), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got["correct_BxT"]), hit)
  np.testing.assert_array_equal(np.asarray(got["cycles_BxT"]), np.asarray(aux["cycles_used"]))


def test_cycle_loss_every_matches_a_plain_loop_over_the_read_out_cycles():
  """model.cycle_loss_every=2 at C = 3: deep supervision and the a0 target over cycles 2 and 3 (the
  last always counts), against a Python loop over every cycle's logits from the same params."""
  assert readout_cycles(tiny_cfg(num_cycles=5, cycle_loss_every=2), 5) == (1, 3, 4)
  assert readout_cycles(tiny_cfg(num_cycles=4, cycle_loss_every=2), 4) == (1, 3)
  assert readout_cycles(tiny_cfg(num_cycles=3), 3) == (0, 1, 2)
  kw = dict(max_seq_len=T, vocab_size=5, num_cycles=3, cycle_loss_weight=0.5, zero_attention_target_weight=0.7,
            zero_attention_target_smoothing=0.1)
  model_all, params = init_params(tiny_cfg(**kw), B, T)
  model_k = ZTTModel(tiny_cfg(cycle_loss_every=2, **kw))
  batch = _batch(model_all.cfg)
  (got, stats), (_, aux) = jax.jit(lambda p: (weighted_loss_sums(model_k, p, batch, 0.5, block_tokens=BLOCK),
                                              model_all.apply({"params": p}, batch["inputs"])))(params)
  cyc, za = np.asarray(aux["cycle_logits"], np.float64), np.asarray(aux["zero_attention"], np.float64)
  w, t = np.asarray(batch["weights"], np.float64), np.asarray(batch["targets"])
  ce_sums, bce_sums = [], []
  for c in range(3):
    logp = cyc[c] - np.log(np.exp(cyc[c]).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
    label = np.where(cyc[c].argmax(-1) == t, 0.9, 0.1)  # smoothing 0.1
    a = 1e-6 + (1 - 2e-6) * za[c]
    bce = -(label * np.log(a) + (1 - label) * np.log(1 - a))
    if (c + 1) % 2 == 0 or c == 2:
      ce_sums.append(np.sum(ce * w))
      bce_sums.append(np.sum(bce * w))
  want_target = np.mean(bce_sums)
  want = ce_sums[-1] + 0.5 * np.mean(ce_sums) + 0.7 * want_target
  np.testing.assert_allclose(float(stats["zero_attention_target_sum"]), want_target, rtol=1e-5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_cycle_loss_every_errors_name_the_fix():
  with pytest.raises(ConfigError, match="cycle_loss_every=0: must be a positive integer"):
    tiny_cfg(cycle_loss_every=0)
  with pytest.raises(ConfigError, match="exit gate's expected loss needs every cycle"):
    tiny_cfg(cycle_loss_every=2, exit_gate=True)
