"""Exit signals and the exit rule.

`ExitRule` says when a token stops cycling and what it shows the other tokens afterwards. Every
caller (training, evaluation, the sweep, cached decoding, generation) passes one rule instead of
loose flags; it is checked once, here.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax.errors import ConfigError
from ztt_jax.model.config import EXIT_GRANULARITIES, EXIT_SIGNALS, FROZEN_KV, ZERO_ATTENTION_SIGNALS

Array = jax.Array

_static = lambda default: flax.struct.field(pytree_node=False, default=default)  # noqa: E731


def confidence(logits_BxTxV: Array) -> Array:
  """CALM-style signal: the max softmax probability of the read-out logits, float32 [B,T]."""
  return jnp.max(jax.nn.softmax(logits_BxTxV.astype(jnp.float32), axis=-1), axis=-1)


def zero_attention_delta(za_prev_BxT: Array, za_BxT: Array, first) -> Array:
  """How little mean a0 moved since the previous cycle, 1 - |a0_c - a0_{c-1}|, float32 [B,T]. At the
  first cycle (`first`, a bool) there is no previous a0 and the signal is 0: no evidence of
  convergence yet, so a token exits there only at a threshold <= 0."""
  return jnp.where(first, 0.0, 1.0 - jnp.abs(za_BxT - za_prev_BxT)).astype(jnp.float32)


def state_delta(x_prev_BxTxD: Array, x_BxTxD: Array, eps: float = 1e-6) -> Array:
  """How little the cycle moved the state (convergence): 1 - ||h_c - h_{c-1}|| / (||h_{c-1}|| + eps)
  per token, clipped at 0, float32 [B,T]. h_{c-1} is the state entering the cycle (the head's output
  for the first one, so every cycle has a value)."""
  x_prev_BxTxD = x_prev_BxTxD.astype(jnp.float32)
  step_BxT = jnp.linalg.norm(x_BxTxD.astype(jnp.float32) - x_prev_BxTxD, axis=-1)
  return jnp.maximum(1.0 - step_BxT / (jnp.linalg.norm(x_prev_BxTxD, axis=-1) + eps), 0.0)


ZERO_ATTENTION_TARGET_EPS = 1e-6


def zero_attention_target_loss(za_CxBxT: Array, right_CxBxT: Array, smoothing: float = 0.0) -> Array:
  """Per cycle and token, the binary cross-entropy of mean a0 as a prediction that the cycle's
  read-out is already right: right_CxBxT = [argmax(logits_c) == target] (a constant; from
  ztt_jax/loss.py, which never holds the logits) as the label s + (1 - 2 s) right with s =
  smoothing (model.zero_attention_target_smoothing), prediction eps + (1 - 2 eps) a0_c. float32
  [C,B,T] (model.zero_attention_target_weight)."""
  right_CxBxT = jax.lax.stop_gradient(right_CxBxT.astype(jnp.float32))
  label_CxBxT = smoothing + (1.0 - 2.0 * smoothing) * right_CxBxT
  eps = ZERO_ATTENTION_TARGET_EPS
  # The affine squash, not a clip, keeps the log finite: a clip would stop the gradient exactly where
  # a0 has collapsed and most needs to move.
  a_CxBxT = eps + (1.0 - 2.0 * eps) * za_CxBxT.astype(jnp.float32)
  return -(label_CxBxT * jnp.log(a_CxBxT) + (1.0 - label_CxBxT) * jnp.log1p(-a_CxBxT))


def halting_distribution(lam_CxBxT: Array) -> Array:
  """The learned gate's exit distribution over C cycles from its halting probabilities lambda_c:
  p(c) = lambda_c prod_{j<c} (1 - lambda_j) for c < C - 1, and the last cycle takes the remaining
  mass prod_{j<C-1} (1 - lambda_j), so p sums to 1 over c (lambda of the last cycle is unused).
  float32 [C,B,T]."""
  lam_CxBxT = lam_CxBxT.astype(jnp.float32)
  stay_CxBxT = 1.0 - lam_CxBxT
  # survival before cycle c: prod_{j<c} (1 - lambda_j); an exclusive cumulative product
  survival_CxBxT = jnp.cumprod(jnp.concatenate([jnp.ones_like(stay_CxBxT[:1]), stay_CxBxT[:-1]]), axis=0)
  halt_CxBxT = jnp.concatenate([lam_CxBxT[:-1], jnp.ones_like(lam_CxBxT[:1])])
  return halt_CxBxT * survival_CxBxT


def kl_to_uniform(p_CxBxT: Array) -> Array:
  """KL(p || uniform over the C cycles) per token, [B,T]: sum_c p log p + log C. Finite gradient
  even where a probability underflows to 0."""
  C = p_CxBxT.shape[0]
  return jnp.sum(p_CxBxT * jnp.log(jnp.maximum(p_CxBxT, 1e-30)), axis=0) + math.log(C)


@flax.struct.dataclass
class ExitRule:
  """A token exits once its signal reaches `threshold` (after at least `min_cycles` cycles); its state
  is then frozen. Exit is sticky.

  It is a pytree whose only leaf is `threshold`: passed into a jitted function the threshold is
  traced, so one compile serves a whole threshold sweep, while the other fields are static (part of
  the compile key). threshold None means no exit, a different program.

  Build it with `ExitRule.from_config(model_cfg, **overrides)`, change it with
  `rule.replace(threshold=0.6)`. The bare constructor's defaults are ModelConfig's defaults, not a
  particular run's.

  signal: what the threshold is compared with after each cycle, float32 in [0, 1], higher = readier:
    'zero_attention': mean a0 over heads and cycled layers (the paper's rule). a0 says "nothing to
      attend to in this layer", which on a sliding-window task is the hardest tokens' state: there it
      fires backwards unless a0 was trained against a target (model.zero_attention_target_weight).
    'zero_attention_last': mean a0 over the heads of the last cycled layer only.
    'zero_attention_delta': 1 - |a0_c - a0_{c-1}| (mean a0 as above): a0 has settled. 0 at the first
      cycle (no previous value), so a token cannot exit there unless the threshold is <= 0.
    'state_delta': 1 - ||h_c - h_{c-1}|| / (||h_{c-1}|| + eps), clipped at 0: the cycle barely moved
      the state (h_{-1} is the head's output). Needs no zero token.
    'confidence': max softmax probability of the cycle's read-out (CALM; through the tail or straight
      from the state, model.cycle_readout); not in cached decoding.
    'gate': the learned exit gate's cumulative exit probability after the cycle,
      1 - prod_{j<=c} (1 - lambda_j); model.exit_gate.
    The zero_attention* signals need the zero token. All are causal, so cached decoding computes the
    same ones (the delta signals' previous values live in the cycle state).
  granularity: 'token' (each token on its own signal; causal) or 'sequence' (every token of a
    sequence once the mean signal over the sequence reaches the threshold).
  frozen_kv: what an exited token shows the other tokens in later cycles. 'state': every cycled
    layer projects its K/V from the frozen state, so those cycles need no attention or MLP work for
    it (what cached decoding computes; it really skips them). 'stack': it still runs through each
    later cycle's stack (its own result is discarded), so layers after the first see recomputed
    states. The two agree when the stack has one layer.
  skip_exited: ZTTModel.__call__ skips the remaining cycles with lax.cond once every token of the
    batch has exited (inference; same results). Cached decoding always skips.
  """
  signal: str = _static("zero_attention")
  threshold: Optional[Any] = None
  min_cycles: int = _static(1)
  granularity: str = _static("token")
  frozen_kv: str = _static("state")
  skip_exited: bool = _static(False)

  def __post_init__(self):
    # Runs again whenever JAX rebuilds the pytree (then threshold may be a tracer), so only Python
    # numbers are checked and normalized: a float keeps jit's cache key the same for every value.
    t = self.threshold
    if isinstance(t, (str, bool)) or (isinstance(t, numbers.Number) and not isinstance(t, numbers.Real)):
      raise ConfigError(f"exit threshold={t!r}: must be a number, or none for no exit")
    if isinstance(t, (numbers.Real, np.ndarray)) and np.ndim(t) == 0 and not isinstance(t, bool):
      if not math.isfinite(float(t)):
        raise ConfigError(f"exit threshold={t!r}: must be finite (use none for no exit)")
      if isinstance(t, (int, float)):
        object.__setattr__(self, "threshold", float(t))
    for name, allowed in (("signal", EXIT_SIGNALS), ("granularity", EXIT_GRANULARITIES),
                          ("frozen_kv", FROZEN_KV)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"exit {name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
    if isinstance(self.min_cycles, bool) or int(self.min_cycles) != self.min_cycles or self.min_cycles < 1:
      raise ConfigError(f"exit min_cycles={self.min_cycles!r}: must be an integer >= 1")

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "ExitRule":
    """The rule a ModelConfig (or the `model` section) describes, with `overrides` applied."""
    fields = dict(threshold=model_cfg.exit_threshold, min_cycles=model_cfg.min_cycles,
                  granularity=model_cfg.exit_granularity, frozen_kv=model_cfg.frozen_kv,
                  signal=getattr(model_cfg, "exit_signal", "zero_attention"))
    return cls(**{**fields, **overrides})

  @property
  def exits(self) -> bool:
    return self.threshold is not None

  def check(self, model_cfg) -> None:
    """The rule can run on this model."""
    if self.exits and self.signal in ZERO_ATTENTION_SIGNALS and not model_cfg.use_zero_token:
      raise ConfigError(f"variant {model_cfg.variant!r} has no zero token, so it cannot exit on "
                        f"{self.signal}; turn exit off (threshold None, --exit_threshold=none) or exit on "
                        "signal='confidence' or 'state_delta' (rules of the sweep)")
    if self.signal == "gate" and not model_cfg.exit_gate:
      raise ConfigError("the exit signal 'gate' needs a model trained with the learned exit gate "
                        "(model.exit_gate=True); exit on zero_attention or confidence instead")

  def update(self, exited_BxT: Array, signal_BxT: Array, cycles_run) -> Array:
    """Who has exited after `cycles_run` (1-based) cycles, given this cycle's float32 signal."""
    if self.granularity == "sequence":
      s_Bx1 = jnp.mean(signal_BxT, axis=1, keepdims=True)
      hit_BxT = jnp.broadcast_to(s_Bx1 >= self.threshold, signal_BxT.shape)
    else:
      hit_BxT = signal_BxT >= self.threshold
    return exited_BxT | (hit_BxT & (cycles_run >= self.min_cycles))
