"""Held-out loss of each cycle's own read-out in trained runs: a fixed cut after cycle c, read out the
way cycle c was trained (`model.cycle_readout`: through the tail, or through the final norm only).

  .venv/bin/python benchmarks/cycle_readout_loss.py WORKDIR [WORKDIR ...] [--batches=16]

It separates the two reasons an early exit can read out badly: a read-out that training never saw
(the exit path reads every exited token through the tail) and a read-out that is weak in itself.
For a `cycle_readout=tail` run the figures equal the exit sweep's fixed cuts on the same batches
(the run's first --batches held-out batches, as `ztt_jax.experiments.exits` sweeps text).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout, no install needed
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ztt_jax import evaluator, restore  # noqa: E402
from ztt_jax.errors import CheckpointError, ConfigError  # noqa: E402
from ztt_jax.model import ZTTModel  # noqa: E402
from ztt_jax.train_step import token_losses  # noqa: E402


def cycle_losses(workdir: str, num_batches: int) -> tuple[str, list[float]]:
  """(the run's cycle_readout, the weighted mean cross-entropy of every read-out cycle
  (model.lm.readout_cycles), the final one last)."""
  trained = restore.load_trained(workdir, devices=jax.devices()[:1])
  if not trained.cfg.model.cycle_loss_weight > 0:
    raise SystemExit(f"{workdir}: trained without deep supervision (model.cycle_loss_weight=0), so its "
                     "cycles have no read-out to measure")
  params = jax.device_get(nn.unbox(trained.params))
  model = ZTTModel(trained.cfg.model)
  per_cycle = jax.jit(lambda p, b: token_losses(model, p, b)[2]["cycle_ce"])
  total_R, weight = 0.0, 0.0
  for batch in evaluator.held_out_batches(trained.cfg, num_batches):
    batch = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "weights")}
    ce_RxBxT, w_BxT = np.asarray(per_cycle(params, batch)), np.asarray(batch["weights"])
    total_R = total_R + (ce_RxBxT * w_BxT).sum(axis=(1, 2))
    weight += w_BxT.sum()
  return trained.cfg.model.cycle_readout, [float(x) for x in total_R / weight]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdirs", nargs="+")
  ap.add_argument("--batches", type=int, default=16)
  args = ap.parse_args(argv)
  for workdir in args.workdirs:
    try:
      readout, losses = cycle_losses(workdir, args.batches)
    except (CheckpointError, ConfigError) as e:  # one line naming the fix, as the package's CLIs do
      raise SystemExit(str(e)) from None
    print(f"{workdir}: read-out {readout!r} per cycle: "
          + ", ".join(f"{x:.4f}" for x in losses), flush=True)


if __name__ == "__main__":
  main()
