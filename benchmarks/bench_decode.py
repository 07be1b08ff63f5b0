"""Decoding tokens/s with early exit off, and with a threshold that halves the mean cycles.

  .venv/bin/python benchmarks/bench_decode.py [--workdir=DIR] [--new_tokens=128] [--batch=1]

With --workdir it decodes that run's checkpoint; without, a randomly initialised ZTT (configs/
default.py's model, 8 cycles) whose zero keys are scaled up so a0 spreads over tokens. The
threshold is found by bisection on the mean cycles per generated token (greedy decoding, so each
threshold's run is deterministic). Throughput is the decode loop alone: runs with n and 2n new tokens
share one compiled program (the count is traced); the difference of their best times is n steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def random_model(cycles: int):
  import flax.linen as nn
  from ztt_jax.model import ModelConfig, ZTTModel
  cfg = ModelConfig(vocab_size=259, d_model=256, num_heads=4, mlp_dim=1024, n_head_layers=1, n_middle_layers=2,
                    n_tail_layers=1, num_cycles=cycles, max_seq_len=512, zero_key_init_std=1.0)
  model = ZTTModel(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--cycles", type=int, default=8, help="cycles of the random model (no --workdir)")
  ap.add_argument("--repeats", type=int, default=3)
  return ap.parse_args(argv)


def measure(args) -> dict:
  """Decode tokens/s with exit off and at the threshold that halves the mean cycles (also used by
  `python -m ztt_jax.bench --suite=exit`)."""
  from ztt_jax import decoding
  from ztt_jax.model import ExitRule
  if args.workdir:
    from ztt_jax import restore
    t = restore.load_trained(args.workdir, devices=jax.devices()[:1])
    model, params = t.run.model, t.params
  else:
    model, params = random_model(args.cycles)
  cfg = model.cfg
  n = args.new_tokens
  max_len = args.prompt_len + 2 * n
  if max_len > cfg.max_seq_len:
    raise SystemExit(f"prompt_len + 2 * new_tokens = {max_len} > max_seq_len {cfg.max_seq_len}; lower --new_tokens")
  prompt = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 256), (args.batch, args.prompt_len))

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
    t1 = min(run(tau, n)[0] for _ in range(args.repeats))
    t2 = min(run(tau, 2 * n)[0] for _ in range(args.repeats))
    return args.batch * n / (t2 - t1)

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
  return {"device": f"{dev.platform} ({dev.device_kind})", "batch": args.batch, "cache": max_len, "cycles": C,
          "new_tokens": n, "tokens_per_sec_off": off, "tokens_per_sec_exit": on, "exit_threshold": tau,
          "mean_cycles": m, "ratio": on / off}


def main():
  r = measure(parse_args())
  C = r["cycles"]
  print(f"device {r['device']}, batch {r['batch']}, cache {r['cache']}, cycles {C}")
  print(f"exit off        : {r['tokens_per_sec_off']:9.1f} tokens/s (mean cycles {C})")
  print(f"exit tau={r['exit_threshold']:.4f}: {r['tokens_per_sec_exit']:9.1f} tokens/s (mean cycles {r['mean_cycles']:.2f})")
  print(f"speedup {r['ratio']:.2f}x at {r['mean_cycles'] / C:.2f} of the cycles")


if __name__ == "__main__":
  main()
