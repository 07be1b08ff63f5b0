"""Model benchmarks; prints ratios, asserts nothing.

  .venv/bin/python benchmarks/bench_model.py [--quick]

1. Compile time vs cycles: compile time of a ZTT with C=32 over C=2 at the same width (target <= 1.5),
   for the forward pass and for forward+backward.
2. Exit speedup: forward time at 8 cycles without exit over the time when the whole batch exits after
   1 cycle on the real-skip path (skip_exited=True) (target >= 3 on CPU).
"""
import argparse
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ztt_jax.bench import compile_seconds, timed  # noqa: E402  (shared with python -m ztt_jax.bench)
from ztt_jax.model import ExitRule, ModelConfig, ZTTModel  # noqa: E402


def bench_compile(width, reps):
  toks = jnp.zeros((4, 64), jnp.int32)
  for grad in (False, True):
    times = {2: [], 32: []}
    for r in range(reps):
      for C in (2, 32):
        # vocab differs by rep so no compilation cache can serve a repeat
        cfg = ModelConfig(d_model=width, num_heads=4, mlp_dim=4 * width, num_cycles=C, vocab_size=256 + r)
        times[C].append(compile_seconds(cfg, toks, grad))
    t2, t32 = statistics.median(times[2]), statistics.median(times[32])
    name = "fwd+bwd" if grad else "fwd"
    print(f"compile {name:8s} C=2: {t2:6.2f}s  C=32: {t32:6.2f}s  ratio C32/C2 = {t32 / t2:.2f}  (target <= 1.5)")


def bench_exit(width, T, B, n):
  cfg = ModelConfig(d_model=width, num_heads=4, mlp_dim=4 * width, num_cycles=8, vocab_size=256, max_seq_len=T)
  model = ZTTModel(cfg)
  toks = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  params = jax.jit(lambda k: nn.unbox(model.init(k, toks)["params"]))(jax.random.key(0, impl="rbg"))

  def run(skip_exited=False):
    return jax.jit(lambda p, t, tau: model.apply({"params": p}, t, ExitRule(threshold=tau, skip_exited=skip_exited))[0])

  full = timed(run(), params, toks, 2.0, n=n)                          # no token exits
  skip = timed(run(skip_exited=True), params, toks, -1.0, n=n)         # all exit after cycle 1
  where = timed(run(), params, toks, -1.0, n=n)                        # all exit, no skipping
  print(f"forward B={B} T={T} D={width} 8 cycles: no exit {full * 1e3:.1f} ms | all exit after 1, "
        f"skip path {skip * 1e3:.1f} ms | all exit after 1, where path {where * 1e3:.1f} ms")
  print(f"exit speedup (no exit / skip after 1) = {full / skip:.2f}  (target >= 3); "
        f"where path saves {full / where:.2f}x")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, cpus={os.cpu_count()}")
  bench_compile(width=128, reps=1 if args.quick else 2)
  bench_exit(width=128 if args.quick else 256, T=128 if args.quick else 256, B=8, n=5 if args.quick else 10)


if __name__ == "__main__":
  main()
