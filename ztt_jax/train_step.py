"""The loss, the sharded train step (with gradient accumulation), and the eval step."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ztt_jax import loss as loss_lib
from ztt_jax.config import Config
from ztt_jax.model.exit import ExitRule, halting_distribution, kl_to_uniform, zero_attention_target_loss
from ztt_jax.model.lm import readout_cycles
from ztt_jax.partitioning import BATCH_AXES


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped_steps: jax.Array


def token_losses(model: nn.Module, params, batch, rule: Optional[ExitRule] = None,
                 num_cycles: Optional[int] = None, *, block_tokens: int = 0, per_cycle: bool = True):
  """The model's per-token cross-entropy [B,T] and argmax == target [B,T] on batch['targets'],
  computed blockwise from the hidden states (ztt_jax/loss.py): the [B,T,V] logits are never held.

  Returns (ce_BxT, hit_BxT, aux): aux is the model's, and when the model reads the cycles out (deep
  supervision, the exit gate, the a0 target) and per_cycle, it also holds cycle_ce and cycle_hit
  [R,B,T] for the R cycles of model.lm.readout_cycles (the last row is the final read-out's).
  block_tokens: train.loss_block_tokens."""
  variables = {"params": params}
  h_BxTxD, aux = model.apply(variables, batch["inputs"], rule, num_cycles, readout=False)
  head = model.apply(variables, method="lm_head")
  h_CxBxTxD = aux.pop("cycle_hidden", None)
  if h_CxBxTxD is None or not per_cycle:
    ce_BxT, hit_BxT = loss_lib.token_losses(h_BxTxD, head, batch["targets"], block_tokens)
    return ce_BxT, hit_BxT, aux
  aux["cycle_ce"], aux["cycle_hit"] = loss_lib.token_losses(h_CxBxTxD, head, batch["targets"], block_tokens)
  return aux["cycle_ce"][-1], aux["cycle_hit"][-1], aux


def weighted_loss_sums(model: nn.Module, params, batch, cycle_loss_weight: float,
                       num_cycles: Optional[int] = None, *, block_tokens: int = 0):
  """Sums (not means) over weighted tokens, so microbatches add up exactly to the full batch.

  Returns (loss_sum, stats) where loss_sum includes the deep-supervision term
  `cycle_loss_weight * mean_c(loss_c)` over the read-out cycles (model.cycle_loss_every), with the exit gate (model.exit_gate) its terms (see
  gate_loss_sums), and with model.zero_attention_target_weight > 0 that weight times the mean over
  cycles of the a0 target's BCE sum (model.exit.zero_attention_target_loss); stats holds per-cycle
  zero-attention sums. num_cycles: static, see ZTTModel.__call__ (a sampled cycle count,
  train.cycles_distribution). block_tokens: train.loss_block_tokens (ztt_jax/loss.py).
  """
  ce_BxT, _, aux = token_losses(model, params, batch, None, num_cycles, block_tokens=block_tokens)
  w_BxT = batch["weights"]
  ce_sum = jnp.sum(ce_BxT * w_BxT)
  loss_sum = ce_sum
  stats = {
      "ce_sum": ce_sum,
      "zero_attention_sum_C": jnp.sum(aux["zero_attention"].astype(jnp.float32) * w_BxT, axis=(1, 2)),
  }
  if "cycle_ce" in aux:
    cycle_ce_CxBxT = aux["cycle_ce"]
    if cycle_loss_weight > 0:
      loss_sum = loss_sum + cycle_loss_weight * jnp.mean(jnp.sum(cycle_ce_CxBxT * w_BxT, axis=(1, 2)))
    if "exit_gate" in aux:
      gate_sum, gate_stats = gate_loss_sums(model.cfg, aux["exit_gate"], cycle_ce_CxBxT, w_BxT)
      loss_sum = loss_sum + gate_sum
      stats.update(gate_stats)
    if model.cfg.zero_attention_target_weight > 0:
      # The read-out cycles' a0 (model.cycle_loss_every): the BCE needs each one's hit.
      za_RxBxT = aux["zero_attention"][np.asarray(readout_cycles(model.cfg, aux["zero_attention"].shape[0]))]
      bce_RxBxT = zero_attention_target_loss(za_RxBxT, aux["cycle_hit"], model.cfg.zero_attention_target_smoothing)
      target_sum = jnp.mean(jnp.sum(bce_RxBxT * w_BxT, axis=(1, 2)))
      loss_sum = loss_sum + model.cfg.zero_attention_target_weight * target_sum
      stats["zero_attention_target_sum"] = target_sum
  return loss_sum, stats


def gate_loss_sums(model_cfg, lam_CxBxT, cycle_ce_CxBxT, w_BxT):
  """The learned exit gate's training terms, summed over weighted tokens (Ouro / LoopLM):
  exit_gate_loss_weight * sum_c p(c) loss_c (the expected loss under the gate's exit distribution)
  + exit_gate_kl_weight * KL(p || uniform). Both reach the gate and, through loss_c, the model."""
  p_CxBxT = halting_distribution(lam_CxBxT)
  expected_sum = jnp.sum(jnp.sum(p_CxBxT * cycle_ce_CxBxT, axis=0) * w_BxT)
  kl_sum = jnp.sum(kl_to_uniform(p_CxBxT) * w_BxT)
  exit_C = jnp.arange(1, p_CxBxT.shape[0] + 1, dtype=jnp.float32)
  stats = {"gate_kl_sum": kl_sum, "gate_expected_ce_sum": expected_sum,
           "gate_exit_cycle_sum": jnp.sum(jnp.einsum("c,cbt->bt", exit_C, p_CxBxT) * w_BxT)}
  return model_cfg.exit_gate_loss_weight * expected_sum + model_cfg.exit_gate_kl_weight * kl_sum, stats


def _split_microbatches(batch, num_micro: int, mesh):
  """[B, ...] -> [M, B/M, ...], striding rows so every microbatch stays spread over all devices."""
  def split(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def sampled_cycles(cfg: Config, step: int) -> Optional[int]:
  """The cycle count of train step `step` (train.cycles_distribution); None when it is off.

  A pure function of (train.seed, step): numpy's Generator seeded with both, so a resumed run (or
  another process) draws the same count for the same step without any state to checkpoint."""
  t = cfg.train
  if t.cycles_distribution == "none":
    return None
  c_max = t.cycles_max or cfg.model.cycles
  mean = (1 + c_max) / 2 if t.cycles_mean is None else t.cycles_mean
  rng = np.random.default_rng([t.seed, step])
  rate = mean - 1.0
  if t.cycles_distribution == "lognormal_poisson":
    # E[exp(sigma z - sigma^2 / 2)] = 1, so the mean stays `mean` before clipping.
    rate *= math.exp(t.cycles_sigma * rng.standard_normal() - t.cycles_sigma ** 2 / 2)
  return int(min(max(1 + rng.poisson(rate), 1), c_max))


TRAIN_STEP_STATIC = (2,)
"""The train step's static positional arguments (num_cycles): jit them, and pass them to
distributed.compile_synced, as static."""


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh,
                    lr_fn: Callable[[jax.Array], jax.Array]):
  """Unjitted step(state, batch, num_cycles=None) -> (state, metrics); the trainer jits it with
  shardings. num_cycles: static, the cycles to run this step (None: model.num_cycles); the trainer
  passes the count it sampled (train.cycles_distribution), and jit keeps one program per count."""
  num_micro = cfg.train.microbatches
  cycle_loss_weight = cfg.model.cycle_loss_weight
  block_tokens = cfg.train.loss_block_tokens

  def step(state: TrainState, batch, num_cycles: Optional[int] = None):
    weight_total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def micro_grads(params, micro):
      def loss_fn(p):
        loss_sum, stats = weighted_loss_sums(model, p, micro, cycle_loss_weight, num_cycles,
                                              block_tokens=block_tokens)
        return loss_sum / weight_total, stats
      return jax.value_and_grad(loss_fn, has_aux=True)(params)

    if num_micro == 1:
      (loss, stats), grads = micro_grads(state.params, batch)
    else:
      micro_batches = _split_microbatches(batch, num_micro, mesh)
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def accumulate(carry, micro):
        loss_acc, stats_acc, grads_acc = carry
        (loss, stats), grads = micro_grads(state.params, micro)
        return (loss_acc + loss, jax.tree.map(jnp.add, stats_acc, stats),
                jax.tree.map(jnp.add, grads_acc, grads)), None

      first = jax.tree.map(lambda x: x[0], micro_batches)
      stats_zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: weighted_loss_sums(model, state.params, first, cycle_loss_weight, num_cycles,
                                     block_tokens=block_tokens)[1]))
      (loss, stats, grads), _ = jax.lax.scan(
          accumulate, (jnp.zeros((), jnp.float32), stats_zero, zeros), micro_batches)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite step is never applied, so non-finite params can never be saved.
    keep_new = lambda new, old: jnp.where(finite, new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=jax.tree.map(keep_new, new_params, state.params),
        opt_state=jax.tree.map(keep_new, new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics = {
        "loss": stats["ce_sum"] / weight_total,
        "objective": loss,
        "grad_norm": grad_norm,
        "lr": lr_fn(state.step),
        "finite": finite,
        "skipped_steps": new_state.skipped_steps,
        "zero_attention_C": stats["zero_attention_sum_C"] / weight_total,
    }
    metrics.update(_recipe_metrics(stats, weight_total, num_cycles))
    return new_state, metrics

  return step


RECIPE_METRICS = ("num_cycles", "gate_kl", "gate_expected_loss", "gate_mean_exit_cycle",
                  "zero_attention_target_loss")
"""Scalars a step reports only with a looped-training recipe on; the trainer logs them as train/<name>."""


def _recipe_metrics(stats: dict, weight_total, num_cycles: Optional[int]) -> dict:
  out = {} if num_cycles is None else {"num_cycles": jnp.int32(num_cycles)}
  if "gate_kl_sum" in stats:
    out.update(gate_kl=stats["gate_kl_sum"] / weight_total,
               gate_expected_loss=stats["gate_expected_ce_sum"] / weight_total,
               gate_mean_exit_cycle=stats["gate_exit_cycle_sum"] / weight_total)
  if "zero_attention_target_sum" in stats:
    out["zero_attention_target_loss"] = stats["zero_attention_target_sum"] / weight_total
  return out


def make_eval_step(model: nn.Module, rule: Optional[ExitRule] = None, *, num_cycles: Optional[int] = None,
                   block_tokens: int = 0, with_signals: bool = False):
  """Per-example sums, and per-token hits and cycles, so the host can aggregate over batches and by
  difficulty (per example when `difficulty` is [B], per scored token when it is [B, T]).

  rule: the exit rule (None: no exit); the step's optional third argument replaces it. Passed
  through jit a rule's threshold is traced, so one compile serves a whole threshold sweep.
  num_cycles: static, see ZTTModel.__call__. block_tokens: train.loss_block_tokens (the per-token
  metrics come from ztt_jax/loss.py, which never holds the logits). with_signals: also return the
  model's zero_attention_CxBxT and exit_signal_CxBxT (the exit sweep's threshold grids).
  """

  def eval_step(params, batch, rule: Optional[ExitRule] = rule):
    ce_BxT, hit_BxT, aux = token_losses(model, params, batch, rule, num_cycles, block_tokens=block_tokens,
                                        per_cycle=False)
    w_BxT = batch["weights"]
    hit_BxT = hit_BxT | (w_BxT == 0)
    signals = ({"zero_attention_CxBxT": aux["zero_attention"], "exit_signal_CxBxT": aux["exit_signal"],
                "weighted_BxT": w_BxT > 0} if with_signals else {})
    return {**signals,
        "ce_sum_B": jnp.sum(ce_BxT * w_BxT, axis=1),
        "weight_B": jnp.sum(w_BxT, axis=1),
        "correct_B": jnp.all(hit_BxT, axis=1) & (jnp.sum(w_BxT, axis=1) > 0),
        "cycles_sum_B": jnp.sum(aux["cycles_used"].astype(jnp.float32) * w_BxT, axis=1),
        "correct_BxT": hit_BxT & (w_BxT > 0),
        "cycles_BxT": aux["cycles_used"],
    }

  return eval_step
