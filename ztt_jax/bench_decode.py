"""Cached-decoding tokens/s with early exit off, and at the threshold that halves the mean cycles.

Used by `python -m ztt_jax.bench --suite=exit` and by benchmarks/bench_decode.py (which prints it).
Without a workdir it decodes a randomly initialised ZTT (d_model 256, 1 + 2 x `cycles` + 1 layers)
whose zero keys are scaled up so a0 spreads over tokens. The threshold is found by
bisection on the mean cycles per generated token (greedy decoding, so each threshold's run is
deterministic). Throughput is the decode loop alone: runs with n and 2n new tokens share one
compiled program (the count is traced); the difference of their best times is n steps.
"""
from __future__ import annotations

import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax import decoding
from ztt_jax.errors import ConfigError
from ztt_jax.model import ExitRule, ModelConfig, ZTTModel


def random_model(cycles: int):
  cfg = ModelConfig(vocab_size=259, d_model=256, num_heads=4, mlp_dim=1024, n_head_layers=1, n_middle_layers=2,
                    n_tail_layers=1, num_cycles=cycles, max_seq_len=512, zero_key_init_std=1.0)
  model = ZTTModel(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def measure(*, workdir: Optional[str] = None, new_tokens: int = 128, prompt_len: int = 16, batch: int = 1,
            cycles: int = 8, repeats: int = 3) -> dict:
  """Decode tokens/s with exit off and at the threshold that halves the mean cycles, of the run in
  `workdir` (its newest checkpoint) or of a random `cycles`-cycle model."""
  if workdir:
    from ztt_jax import restore
    t = restore.load_trained(workdir, devices=jax.devices()[:1])
    model, params = t.run.model, t.params
  else:
    model, params = random_model(cycles)
  cfg = model.cfg
  n = new_tokens
  max_len = prompt_len + 2 * n
  if max_len > cfg.max_seq_len:
    raise ConfigError(f"prompt_len + 2 * new_tokens = {max_len} > max_seq_len {cfg.max_seq_len}; lower new_tokens")
  prompt = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 256), (batch, prompt_len))

  def run(tau, new):
    t0 = time.perf_counter()
    rule = ExitRule.from_config(cfg, threshold=tau, granularity="token")
    g = decoding.generate(model, params, prompt, max_new_tokens=new, sampling=decoding.Sampling(temperature=0.0),
                          rule=rule, max_len=max_len)
    return time.perf_counter() - t0, g

  def mean_cycles(tau):
    _, g = run(tau, n)
    return float(g.step_cycles[:, 1:].mean())  # token 0 comes from the prefill

  def tokens_per_s(tau):
    run(tau, n)  # compile
    # Best of each length separately: a difference of two noisy times, minimised, would be biased low.
    t1 = min(run(tau, n)[0] for _ in range(repeats))
    t2 = min(run(tau, 2 * n)[0] for _ in range(repeats))
    return batch * n / (t2 - t1)

  C = cfg.cycles
  # Mean cycles fall as tau falls; bisect for C / 2.
  lo, hi = 0.0, 1.0
  for _ in range(14):
    mid = (lo + hi) / 2
    if mean_cycles(mid) > C / 2:
      hi = mid
    else:
      lo = mid
  tau = lo
  m = mean_cycles(tau)
  off = tokens_per_s(None)
  on = tokens_per_s(tau)
  dev = jax.devices()[0]
  return {"device": f"{dev.platform} ({dev.device_kind})", "batch": batch, "cache": max_len, "cycles": C,
          "new_tokens": n, "tokens_per_sec_off": off, "tokens_per_sec_exit": on, "exit_threshold": tau,
          "mean_cycles": m, "ratio": on / off}
