"""Evaluate a checkpoint on the held-out split, optionally sweeping exit rules.

  python -m ztt_jax.evaluate --workdir=DIR [--step=N] [--exit_threshold=TAU|none] [--output=FILE.json]
  python -m ztt_jax.evaluate --workdir=DIR --sweep [--output=FILE.json]   (also writes FILE.png)
  python -m ztt_jax.evaluate --workdir=DIR --max_difficulty=N --num_cycles=C   (test-time depth)

The flags and main only; the library (Evaluator, evaluate, sweep, and what the JSON fields mean) is
ztt_jax/evaluator.py.
"""
import json

from ztt_jax import cli
from ztt_jax import storage
from ztt_jax.errors import ConfigError


def main(argv):
  del argv
  from absl import flags
  from ztt_jax import evaluator
  FLAGS = flags.FLAGS
  if FLAGS.sweep and (FLAGS.num_cycles is not None or FLAGS.max_difficulty is not None):
    raise ConfigError("--sweep runs the trained depth; drop --num_cycles/--max_difficulty, or drop --sweep")
  if FLAGS.num_cycles is not None and FLAGS.num_cycles < 1:
    raise ConfigError(f"--num_cycles={FLAGS.num_cycles}: must be >= 1")
  if FLAGS.max_batches is not None and FLAGS.max_batches < 1:
    raise ConfigError(f"--max_batches={FLAGS.max_batches}: must be >= 1 (omit it for the whole split)")
  trained, rule = cli.load_trained_run()
  if FLAGS.sweep:
    result = evaluator.sweep(trained, rule, num_thresholds=FLAGS.num_thresholds, max_batches=FLAGS.max_batches)
    out, png = write_sweep(result, FLAGS.workdir, FLAGS.output)
    for p in result["points"]:
      print(f"{p['rule']:>14} {p['parameter']!s:>10.8} | {result['metric']} {p[result['metric']]:.4f} | "
            f"mean cycles {p['mean_cycles']:.2f} | compute {p['compute_fraction']:.3f}")
    print(f"wrote {out} and {png}")
    return
  result = evaluator.evaluate(trained, rule, max_batches=FLAGS.max_batches, num_cycles=FLAGS.num_cycles,
                              max_difficulty=FLAGS.max_difficulty)
  print(json.dumps(result, indent=2))
  if "per_difficulty" in result:
    print(evaluator.per_difficulty_table(result))
  if FLAGS.output:
    evaluator.write_json(result, FLAGS.output)


def write_sweep(result: dict, workdir: str, output=None) -> tuple[str, str]:
  """Writes a sweep's JSON to `output` (default WORKDIR/sweep_step<N>.json) and its plot beside it;
  either may be a URL (gs://...). Returns both paths."""
  from ztt_jax import evaluator
  from ztt_jax.plots import plot_quality_vs_compute
  out = output or storage.join(storage.absolute(workdir), f"sweep_step{result['step']}.json")
  evaluator.write_json(result, out)
  stem = out[:-len(".json")] if out.endswith(".json") else out
  return out, plot_quality_vs_compute(result, stem + ".png")


def _define_flags():
  from absl import flags
  cli.define_trained_run_flags()  # --workdir, --step, --exit_threshold, --frozen_kv
  flags.DEFINE_string("output", None, "Write the JSON here (with --sweep also FILE.png; default "
                      "WORKDIR/sweep_step<N>.json).")
  flags.DEFINE_bool("sweep", False, "Sweep the zero-attention, fixed-cut and confidence exit rules (and the "
                    "learned gate's, when the model has one).")
  flags.DEFINE_integer("num_thresholds", 8, "Thresholds per threshold rule in --sweep.")
  flags.DEFINE_integer("max_batches", None, "Evaluate only this many held-out batches (default: all).")
  flags.DEFINE_integer("num_cycles", None, "Run this many cycles instead of the trained count (test-time "
                       "depth; cycles past the pool reuse its last row).")
  flags.DEFINE_integer("max_difficulty", None, "Embedded tasks: evaluate held-out examples of difficulty "
                       "1..N instead of the trained range (depth extrapolation; multi-hop: lookups, "
                       "propagation: windows to the marker); seq_len grows to fit.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)  # one-line errors (exit 2: flags, config, data; 1: checkpoints), --verbose
