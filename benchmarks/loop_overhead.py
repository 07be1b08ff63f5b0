"""What a looped train step costs beyond its FLOPs: the text ladder's rungs, timed against `vanilla-8`.

  .venv/bin/python benchmarks/loop_overhead.py [--arms=...] [--rounds=7] [--json=FILE]

Every arm is the text ladder's own config (`ztt_jax.experiments.ladder.rung_config("text", ...)`:
nanoGPT's baby width, T 64, batch 12, deep supervision 0.5) with at most one change, built and jitted
by the trainer's code (`benchmarks/ztt_step.py`), fed the same Tiny Shakespeare batches (or random
bytes without --data). Per arm it prints:
  - dot FLOPs actually executed per step (the optimized HLO, loop trip counts included) over the
    model FLOPs of `vanilla-8` (3 x forward matmuls at effective depth 8): what the extra read-outs add;
  - top-level HLO ops and while loops (each a dispatch on XLA:CPU);
  - tokens/s, median of alternating timing windows, and the step-time ratio to `vanilla-8` in the same
    run (issue 21's goal: ztt <= 1.1x).

Arms (ARMS below): the ladder's vanilla-8, htc, ztt, ztt+direct (each cycle before the last read
out through the final norm only, not the tail) and ztt+every2 (cycles 2 and 3 read out); ztt with only
the last cycle read out (`cycle_loss_every=3`) and without deep supervision (`cycle_loss_weight=0`).
Run it on an idle machine: the load average before and after is printed and saved.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from hlo_stats import hlo_stats  # noqa: E402
from ztt_step import ZttStep, alternating_windows, token_batches  # noqa: E402
from ztt_jax.config import parse, to_dict  # noqa: E402
from ztt_jax.experiments.ladder import rung_config  # noqa: E402
from ztt_jax.flops import train_flops_per_token  # noqa: E402

ARMS = {
    "vanilla-8": ("vanilla-8", {}),
    "htc": ("htc", {}),
    "ztt": ("ztt", {}),
    "ztt+direct": ("ztt+direct", {}),
    "ztt+every2": ("ztt+every2", {}),
    "ztt last-only": ("ztt", {"cycle_loss_every": 3}),
    "ztt no-ds": ("ztt", {"cycle_loss_weight": 0.0}),
}
BASELINE = "vanilla-8"


def arm_config(arm: str, data_path: str):
  rung, over = ARMS[arm]
  cfg = rung_config("text", rung, 0, data_path=data_path or "<batches fed by the benchmark>", steps=10_000)
  return parse(dict(to_dict(cfg), model={**to_dict(cfg)["model"], **over}))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
  ap.add_argument("--data", default=None, help="a text file (Tiny Shakespeare); random bytes without it")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--window_s", type=float, default=2.0)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise SystemExit(f"--arms: unknown {unknown}; use {', '.join(ARMS)}")
  if BASELINE not in arms:
    arms.insert(0, BASELINE)
  load_before = os.getloadavg()
  device = jax.devices("cpu")[0]
  # Every arm is a rung of the same ladder: one shape, one batch list, FLOPs relative to the baseline's.
  base_cfg = arm_config(BASELINE, args.data)
  T, B = base_cfg.data.seq_len, base_cfg.train.global_batch_size
  batches = token_batches(4, B, T, base_cfg.model.vocab_size, data_path=args.data)
  base_model_flops = train_flops_per_token(base_cfg.model, T) * B * T
  steps, res = {}, {}
  for arm in arms:
    cfg = arm_config(arm, args.data)
    st = ZttStep(cfg, device)
    compile_s = st.compile(batches[0])
    stats = hlo_stats(st.compiled.as_text())
    model_flops = train_flops_per_token(cfg.model, T) * B * T
    steps[arm] = st
    res[arm] = {"model_flops": model_flops, "dot_flops": stats.get("dot_flops", 0),
                "top_level_ops": stats.get("top_level_ops", 0), "while_loops": stats.get("while_loops", 0),
                "compile_s": compile_s}
    print(f"{arm:12s} dot FLOPs {res[arm]['dot_flops'] / base_model_flops:5.2f}x vanilla-8's model FLOPs "
          f"(its own model FLOPs {model_flops / base_model_flops:.2f}x) | {res[arm]['top_level_ops']:5d} top-level "
          f"ops, {res[arm]['while_loops']} loops | compile {compile_s:.1f}s", flush=True)
  windows = alternating_windows(steps, batches, B * T, args.rounds, args.window_s)
  base = statistics.median(windows[BASELINE])
  print(f"\ntokens/s, median of {args.rounds} alternating windows; step time relative to {BASELINE}:")
  for arm in arms:
    tps = statistics.median(windows[arm])
    res[arm].update(tokens_per_sec=tps, windows=windows[arm], step_time_vs_vanilla8=base / tps)
    print(f"  {arm:12s} {tps:9,.0f} tok/s   {base / tps:5.2f}x", flush=True)
  load_after = os.getloadavg()
  print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "load_before": load_before, "load_after": load_after,
                 "data": args.data, "arms": res}, f, indent=1)
  return res


if __name__ == "__main__":
  main()
