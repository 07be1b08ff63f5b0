"""Decoding tokens/s with early exit off, and with a threshold that halves the mean cycles.

  .venv/bin/python benchmarks/bench_decode.py [--workdir=DIR] [--new_tokens=128] [--batch=1]

The measurement is ztt_jax/bench_decode.py (also run by `python -m ztt_jax.bench --suite=exit`);
this prints it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ztt_jax.bench_decode import measure  # noqa: E402
from ztt_jax.errors import ConfigError  # noqa: E402


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--cycles", type=int, default=8, help="cycles of the random model (no --workdir)")
  ap.add_argument("--repeats", type=int, default=3)
  return ap.parse_args(argv)


def main():
  try:
    r = measure(**vars(parse_args()))
  except ConfigError as e:
    raise SystemExit(str(e))
  C = r["cycles"]
  print(f"device {r['device']}, batch {r['batch']}, cache {r['cache']}, cycles {C}")
  print(f"exit off        : {r['tokens_per_sec_off']:9.1f} tokens/s (mean cycles {C})")
  print(f"exit tau={r['exit_threshold']:.4f}: {r['tokens_per_sec_exit']:9.1f} tokens/s (mean cycles {r['mean_cycles']:.2f})")
  print(f"speedup {r['ratio']:.2f}x at {r['mean_cycles'] / C:.2f} of the cycles")


if __name__ == "__main__":
  main()
