"""Evaluation of a trained run on its held-out split, and the exit-rule sweep (the library behind
`python -m ztt_jax.evaluate`, whose flags and main live in ztt_jax/evaluate.py).

Quality and compute are measured on the loss-weighted tokens (for the embedded tasks: the scored
digits), so loss, mean_cycles and compute_fraction describe the same tokens. The embedded tasks
(data.SYNTHETIC_KINDS) label every scored token with a difficulty: the multi-hop task's hop count,
the propagation task's windows between a position and its marker.

The sweep compares exit rules on the same params: a fixed cut after c = 1..C cycles (apply's
num_cycles), and threshold ranges on each signal of `sweep_signals`: CALM's confidence (max softmax
probability of the cycle's read-out), the state's convergence (state_delta), with the zero token the
a0 signals (zero_attention, zero_attention_last, zero_attention_delta), and the learned exit gate's
CDF when the model has one (model.exit_gate). Threshold grids are quantiles of the signal measured on
the eval batches with every cycle run, so each rule's curve spans its own range.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from ztt_jax import data as data_lib
from ztt_jax import partitioning
from ztt_jax.data.config import SYNTHETIC_KINDS, multihop_min_seq_len, propagation_min_seq_len
from ztt_jax.distributed import compile_synced
from ztt_jax.errors import ConfigError, DataError
from ztt_jax.flops import forward_flops_per_token, readout_flops_per_token
from ztt_jax.model.config import ZERO_ATTENTION_SIGNALS
from ztt_jax.model.exit import ExitRule
from ztt_jax.partitioning import to_global
from ztt_jax.run import Run
from ztt_jax.train_step import make_eval_step


def held_out_batches(cfg, max_batches: Optional[int] = None) -> list:
  """The run's held-out batches (this process's rows); all of them unless max_batches is set."""
  batches = list(data_lib.make_eval_batches(
      cfg.data, global_batch_size=cfg.eval.batch_size or cfg.train.global_batch_size,
      vocab_size=cfg.model.vocab_size, process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=max_batches))
  if not batches:
    raise DataError("The run's data has no held-out split (data.eval_fraction=0 or data.eval_examples=0), so "
                    "there is nothing to evaluate. Train with a held-out split.")
  return batches


class Evaluator:
  """Held-out loss, and for the embedded tasks accuracy and mean cycles per difficulty.

  rule: the exit rule (model.exit.ExitRule); default the run's configured one,
  ExitRule.from_config(run.cfg.model). Calling with another rule evaluates that one; when only its
  threshold differs the compiled step is reused (exit off is a second compile). num_cycles goes to
  model.apply (`sweep` uses it for the fixed-cut baseline).
  Returns {"eval/loss", "eval/mean_cycles"} and, for data with a `difficulty` label (the embedded
  tasks), "eval/accuracy" and "eval/per_difficulty": {difficulty: {"accuracy", "mean_cycles"}} (flat
  names only in ztt_jax.metrics). With per-token `difficulty` [B, T] (0 where unscored) these are per
  scored token; with `difficulty` [B], per example. For the multi-hop task the difficulty is the
  query's hop count; for propagation, the windows between a position and its marker.
  with_signals: the result also holds "signals": {"zero_attention", "exit_signal"}, each [C, N] over
  the N loss-weighted tokens (the model's aux; cycles a token did not run are 0).
  """

  def __init__(self, run: Run, batches: list, rule: Optional[ExitRule] = None, *,
               num_cycles: Optional[int] = None, with_signals: bool = False):
    self.run = run
    self.batches = batches
    self.rule = ExitRule.from_config(run.cfg.model) if rule is None else rule
    self.with_signals = with_signals
    step = make_eval_step(run.model, num_cycles=num_cycles, block_tokens=run.cfg.train.loss_block_tokens,
                          with_signals=with_signals)
    repl = partitioning.replicated(run.mesh)
    self._fn = compile_synced(jax.jit(lambda p, b, rule: (step(p, b, rule), b.get("difficulty")),
                                      in_shardings=(run.param_shardings, None, None), out_shardings=repl))

  def __call__(self, params, rule: Optional[ExitRule] = None) -> dict:
    if not self.batches:  # eval.max_batches=0
      return {}
    rule = self.rule if rule is None else rule
    sums = {"ce": 0.0, "w": 0.0, "cycles": 0.0}
    per_difficulty: dict[int, np.ndarray] = {}  # d -> [scored rows, correct, cycles] summed
    signals: dict[str, list] = {"zero_attention": [], "exit_signal": []}
    with jax.set_mesh(self.run.mesh), nn.logical_axis_rules(self.run.axis_rules):
      for local in self.batches:
        out, difficulty = jax.device_get(self._fn(params, to_global(local, self.run.mesh), rule))
        valid = out["weight_B"] > 0
        if self.with_signals:
          for name in signals:
            signals[name].append(np.asarray(out[f"{name}_CxBxT"])[:, out["weighted_BxT"]])
        sums["ce"] += float(out["ce_sum_B"].sum())
        sums["w"] += float(out["weight_B"].sum())
        sums["cycles"] += float(out["cycles_sum_B"].sum())
        if difficulty is None:
          continue
        if difficulty.ndim == 2:  # per token (several scored tokens per example): one row per scored token
          scored_BxT = difficulty > 0
          d_N, ok_N, cycles_N = difficulty[scored_BxT], out["correct_BxT"][scored_BxT], out["cycles_BxT"][scored_BxT]
        else:  # per example
          d_N, ok_N = difficulty[valid], out["correct_B"][valid]
          cycles_N = out["cycles_sum_B"][valid] / out["weight_B"][valid]
        for d in np.unique(d_N):
          at_d = d_N == d
          per_difficulty.setdefault(int(d), np.zeros(3))
          per_difficulty[int(d)] += (at_d.sum(), ok_N[at_d].sum(), cycles_N[at_d].sum())
    result = {"eval/loss": sums["ce"] / max(sums["w"], 1.0),
              "eval/mean_cycles": sums["cycles"] / max(sums["w"], 1.0)}
    if self.with_signals:
      result["signals"] = {name: np.concatenate(v, axis=1) for name, v in signals.items()}
    if per_difficulty:
      n, correct, _ = np.sum(list(per_difficulty.values()), axis=0)
      result["eval/accuracy"] = float(correct / n)
      result["eval/per_difficulty"] = {d: {"accuracy": float(s[1] / s[0]), "mean_cycles": float(s[2] / s[0])}
                                       for d, s in sorted(per_difficulty.items())}
    return result


def is_byte_data(data_cfg) -> bool:
  # tokens/array_record hold ids of an unknown tokenizer, so only these are known to be bytes.
  return data_cfg.kind in SYNTHETIC_KINDS or (data_cfg.kind == "text" and data_cfg.tokenizer == "bytes")


def compute_fraction(model_cfg, seq_len: int, mean_cycles: float, signal_readouts: float = 0.0) -> float:
  """FLOPs per token at `mean_cycles` (plus `signal_readouts` extra read-outs) over FLOPs with
  every cycle. Exact for a mean over tokens because FLOPs are affine in the cycles."""
  used = forward_flops_per_token(model_cfg, seq_len, mean_cycles)
  used += signal_readouts * readout_flops_per_token(model_cfg, seq_len)
  return used / forward_flops_per_token(model_cfg, seq_len)


def summarize(metrics: dict, cfg, *, rule: str, parameter) -> dict:
  """Evaluator metrics ('eval/...') -> the JSON fields of one evaluation."""
  m = cfg.model
  seq_len = cfg.data.seq_len
  out = {"rule": rule, "parameter": parameter, "loss": metrics["eval/loss"]}
  if is_byte_data(cfg.data):
    out["bits_per_byte"] = metrics["eval/loss"] / math.log(2)
  else:
    out["perplexity"] = math.exp(min(metrics["eval/loss"], 700.0))
  out["mean_cycles"] = metrics["eval/mean_cycles"]
  out["compute_fraction"] = compute_fraction(m, seq_len, out["mean_cycles"])
  if rule == "confidence":
    # The signal itself costs a read-out (tail + LM head) for every cycle a token runs.
    out["compute_fraction_incl_signal"] = compute_fraction(m, seq_len, out["mean_cycles"], out["mean_cycles"])
  if "eval/accuracy" in metrics:
    out["accuracy"] = metrics["eval/accuracy"]
    out["per_difficulty"] = {
        str(d): {**by, "compute_fraction": compute_fraction(m, seq_len, by["mean_cycles"])}
        for d, by in metrics["eval/per_difficulty"].items()}
  return out


def evaluate(trained, rule: Optional[ExitRule] = None, *, batches: Optional[list] = None,
             max_batches: Optional[int] = None, num_cycles: Optional[int] = None,
             max_difficulty: Optional[int] = None) -> dict:
  """JSON-ready metrics of `trained` (restore.TrainedRun) under the exit rule `rule` (default: the
  run's configured one, ExitRule.from_config(trained.cfg.model); threshold None: no exit).

  Test-time depth: num_cycles runs more or fewer cycles than trained (pool rows past the trained
  count reuse the last one); max_difficulty evaluates an embedded task's held-out stream at
  difficulties 1..max_difficulty (see `at_difficulty`). compute_fraction stays relative to the
  trained cycle count, so it exceeds 1 when more cycles run."""
  cfg = trained.cfg if max_difficulty is None else at_difficulty(trained.cfg, max_difficulty)
  rule = ExitRule.from_config(cfg.model) if rule is None else rule
  batches = held_out_batches(cfg, max_batches) if batches is None else batches
  metrics = Evaluator(trained.run, batches, rule, num_cycles=num_cycles)(trained.params)
  out = summarize(metrics, cfg, rule=rule.signal if rule.exits else "none", parameter=rule.threshold)
  return {"step": trained.step, "exit_threshold": rule.threshold, "exit_signal": rule.signal,
          "frozen_kv": rule.frozen_kv, "trained_cycles": cfg.model.cycles,
          "num_cycles": cfg.model.cycles if num_cycles is None else num_cycles,
          "trained_max_difficulty": task_max_difficulty(trained.cfg.data),
          "max_difficulty": task_max_difficulty(cfg.data),
          "num_batches": len(batches), **out}


def task_max_difficulty(data_cfg) -> Optional[int]:
  """The hardest difficulty an embedded task's data config draws (multi-hop: data.max_hops;
  propagation: data.max_difficulty); None for other data."""
  return {"multihop": data_cfg.max_hops, "propagation": data_cfg.max_difficulty}.get(data_cfg.kind)


def at_difficulty(cfg, max_difficulty: int):
  """`cfg` with the embedded task's held-out stream at difficulties 1..max_difficulty (multi-hop:
  queries of that many lookups, data.max_hops; propagation: marker gaps of that many windows,
  data.max_difficulty), data.seq_len grown to fit the longest example; the params and everything
  else stay."""
  if cfg.data.kind not in SYNTHETIC_KINDS:
    raise ConfigError(f"--max_difficulty applies to the embedded tasks {SYNTHETIC_KINDS} only; this run "
                      f"trained on data.kind={cfg.data.kind!r}. Omit --max_difficulty.")
  if max_difficulty < 1:
    raise ConfigError(f"--max_difficulty={max_difficulty}: must be >= 1")
  d = cfg.data
  if d.kind == "multihop":
    need = multihop_min_seq_len(max_difficulty, d.num_distractors, d.num_queries)
    data = dataclasses.replace(d, max_hops=max_difficulty, seq_len=max(d.seq_len, need))
  else:
    need = propagation_min_seq_len(d.window, max_difficulty)
    data = dataclasses.replace(d, max_difficulty=max_difficulty, seq_len=max(d.seq_len, need))
  data.validate()  # e.g. more variables than the alphabet holds: names the limit
  if cfg.model.position == "learned" and data.seq_len > cfg.model.max_seq_len:
    raise ConfigError(f"--max_difficulty={max_difficulty} needs sequences of {data.seq_len} tokens, past the "
                      f"learned position table (model.max_seq_len={cfg.model.max_seq_len}); use a smaller "
                      "--max_difficulty.")
  return dataclasses.replace(cfg, data=data)


def sweep_signals(model_cfg) -> list[str]:
  """The signals the sweep runs threshold rules on, for this model."""
  a0 = list(ZERO_ATTENTION_SIGNALS) if model_cfg.use_zero_token else []
  return ["confidence", *a0, "state_delta"] + (["gate"] if model_cfg.exit_gate else [])


def signal_range(signals: dict, signal: str, num_cycles: int) -> np.ndarray:
  """The values of `signal` that a threshold on it can act on, from an Evaluator's "signals" with
  every cycle run: the cycles before the last, where exiting saves something (zero_attention_delta
  from the second on, its first cycle being 0 by definition). 'zero_attention' is read off any run."""
  C = num_cycles
  if signal == "zero_attention":
    return signals["zero_attention"][: max(C - 1, 1)].ravel()
  lo = 1 if signal == "zero_attention_delta" and C > 2 else 0
  return signals["exit_signal"][lo: max(C - 1, lo + 1)].ravel()


def signal_values(trained, batches: list, signal: str) -> np.ndarray:
  """`signal`'s values on the loss-weighted tokens with every cycle run (see `signal_range`)."""
  ev = Evaluator(trained.run, batches, ExitRule(signal=signal), with_signals=True)
  never = ev(trained.params, ExitRule(signal=signal, threshold=NEVER_EXIT))
  return signal_range(never["signals"], signal, trained.cfg.model.cycles)


NEVER_EXIT = 1.001
"""Every signal lies in [0, 1], so this threshold is the no-exit end of a curve. (The
largest signal seen without exits is not: once some tokens exit, the others' signals change.)"""


def threshold_grid(values: np.ndarray, n: int) -> list[float]:
  """n thresholds from 'everything exits at the first chance' (the smallest signal seen) to
  NEVER_EXIT, the others at quantiles of the signal."""
  qs = np.quantile(values, np.linspace(0.0, 1.0, n)[:-1])
  return sorted({float(q) for q in qs} | {NEVER_EXIT})


def sweep(trained, rule: Optional[ExitRule] = None, *, batches: Optional[list] = None, num_thresholds: int = 8,
          max_batches: Optional[int] = None, thresholds: Optional[Sequence[float]] = None) -> dict:
  """Quality vs compute for the fixed-cut rule and a threshold rule on each of `sweep_signals`
  (zero attention and its variants, state_delta, confidence, the learned gate's CDF) on one checkpoint.

  rule: the sweep varies its signal and threshold and keeps the rest (frozen_kv, min_cycles,
    granularity); default the run's configured rule.
  thresholds: use these for every threshold rule instead of the quantile grids."""
  cfg = trained.cfg
  base = ExitRule.from_config(cfg.model) if rule is None else rule
  C = cfg.model.cycles
  if num_thresholds < 2:
    raise ConfigError(f"num_thresholds={num_thresholds}: must be >= 2")
  batches = held_out_batches(cfg, max_batches) if batches is None else batches
  metric = "accuracy" if cfg.data.kind in SYNTHETIC_KINDS else "loss"
  points = []
  for c in range(1, C + 1):
    ev = Evaluator(trained.run, batches, base.replace(threshold=None), num_cycles=c)
    points.append(summarize(ev(trained.params), cfg, rule="fixed", parameter=c))
  for signal in sweep_signals(cfg.model):
    # One program per signal: its no-exit end (NEVER_EXIT) also gives the values the grid is drawn from.
    ev = Evaluator(trained.run, batches, base.replace(signal=signal, threshold=0.0),
                   with_signals=thresholds is None)
    done = {}
    if thresholds is None:
      done[NEVER_EXIT] = ev(trained.params, ev.rule.replace(threshold=NEVER_EXIT))
      grid = threshold_grid(signal_range(done[NEVER_EXIT]["signals"], signal, C), num_thresholds)
    else:
      grid = list(thresholds)
    for tau in grid:
      metrics = done.get(tau) or ev(trained.params, ev.rule.replace(threshold=float(tau)))
      points.append(summarize(metrics, cfg, rule=signal, parameter=float(tau)))
  return {"step": trained.step, "metric": metric, "num_cycles": C, "frozen_kv": base.frozen_kv,
          "num_batches": len(batches), "data_kind": cfg.data.kind, "points": points}


def per_difficulty_table(result: dict) -> str:
  """Accuracy and mean cycles by difficulty, as the console shows it."""
  rows = [f"difficulty | accuracy | mean cycles   ({result['num_cycles']} cycles, trained "
          f"{result['trained_cycles']}; exit threshold {result['exit_threshold']})"]
  for d, by in result["per_difficulty"].items():
    rows.append(f"{d:>10} | {by['accuracy']:8.1%} | {by['mean_cycles']:.2f}")
  return "\n".join(rows)


def write_json(obj: dict, path: str) -> str:
  """`obj` as JSON at `path` (a local path or a URL), replaced at once."""
  from ztt_jax import storage
  storage.makedirs(storage.parent(storage.absolute(path)))
  storage.write_text(path, json.dumps(obj, indent=2))
  return path
