"""The ablation ladder: train it (resumable), run the exit sweeps, or write the report.

  python -m ztt_jax.experiments.ablation --task=text --data=PATH --out=runs/ablation [--seeds=3] [--steps=N]
  python -m ztt_jax.experiments.ablation --task=text --data=PATH --rungs=ztt+inject,ztt+gate --seeds=1
  python -m ztt_jax.experiments.ablation --task=multihop --out=runs/ablation
  python -m ztt_jax.experiments.ablation --task=multihop --sweep [--sweep_rung=ztt+gate] --out=runs/ablation [--docs=docs]
  python -m ztt_jax.experiments.ablation --report --out=runs/ablation [--docs=docs]

Re-running a training command skips finished runs and resumes a partial one from its checkpoint.
"""
from __future__ import annotations

import logging

from absl import app, flags

flags.DEFINE_enum("task", None, ["text", "multihop"], "Which ladder to train.")
flags.DEFINE_string("data", None, "Text file for --task=text (the last 10% is held out).")
flags.DEFINE_string("out", "runs/ablation", "Root of the ladder's work directories (OUT/TASK/RUNG_sSEED).")
flags.DEFINE_integer("seeds", 3, "Seeds per rung (init seeds 0..N-1).")
flags.DEFINE_integer("steps", None, "Optimizer steps per run; default: the ladder's budget.")
flags.DEFINE_list("rungs", None, "Rungs to train (default: the five base rungs; recipes: ztt+inject, ztt+gate, ztt+random).")
flags.DEFINE_bool("sweep", False, "Sweep the exit rules of the trained --sweep_rung of --task into DOCS/results "
                  "(multi-hop: also test-time depth).")
flags.DEFINE_string("sweep_rung", "ztt", "Rung whose trained models --sweep evaluates (ztt+gate adds the gate rule).")
flags.DEFINE_bool("report", False, "Summarise OUT into DOCS/results/*.json and plot DOCS/*.png.")
flags.DEFINE_string("docs", "docs", "Where --report writes.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  if FLAGS.report:
    from ztt_jax.experiments import report
    report.write_all(FLAGS.out, FLAGS.docs)
    return
  if not FLAGS.task:
    raise app.UsageError("pass --task=text|multihop (or --report)")
  import os
  import jax
  # Seeds of a rung compile identical programs; the persistent cache turns the repeats into loads.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(FLAGS.out), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if FLAGS.sweep:
    from ztt_jax.experiments.exits import sweep_ztt
    sweep_ztt(FLAGS.task, FLAGS.out, os.path.join(FLAGS.docs, "results"), FLAGS.seeds, rung=FLAGS.sweep_rung,
              log=lambda s: print(s, flush=True))
    return
  from ztt_jax.experiments.runs import run_ladder
  run_ladder(FLAGS.task, FLAGS.out, FLAGS.seeds, data_path=FLAGS.data, steps=FLAGS.steps,
             rungs=FLAGS.rungs, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  app.run(main)
