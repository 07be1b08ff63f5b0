"""The ablation ladder: train it (resumable), run the exit sweeps, or write the report.

  python -m ztt_jax.experiments.ablation --task=text --data=PATH --out=runs/ablation [--seeds=3] [--steps=N]
  python -m ztt_jax.experiments.ablation --task=text --data=PATH --rungs=ztt+inject,ztt+gate --seeds=1
  python -m ztt_jax.experiments.ablation --task=propagation --out=runs/ablation   (configs/default.py's task)
  python -m ztt_jax.experiments.ablation --task=multihop --out=runs/ablation
  python -m ztt_jax.experiments.ablation --task=propagation --sweep [--sweep_rung=ztt+gate] --out=runs/ablation [--docs=docs]
  python -m ztt_jax.experiments.ablation --report --out=runs/ablation [--docs=docs] [--overwrite]

--sweep and --report write into OUT/report unless --docs names a directory (--docs=docs publishes
into the repo's docs/); there the report replaces only files it wrote, and never a ladder built
from more runs, seeds or steps unless --overwrite (ztt_jax/experiments/published.py).

Re-running a training command skips finished runs and resumes a partial one from its checkpoint.
Every rung's config is built (and checked) before the first one trains.
"""
from __future__ import annotations

import logging

from absl import app, flags

from ztt_jax import storage
from ztt_jax.experiments import ladder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected argument(s) {argv[1:]}; every option is a --flag (--helpshort lists them)")
  f = flags.FLAGS
  check_rung_names(f)
  logging.getLogger().setLevel(logging.WARNING)
  if f.report:
    from ztt_jax.experiments import report
    report.write_all(f.out, f.docs, overwrite=f.overwrite)
    return
  rungs = check_args(f)
  import jax
  # Seeds of a rung compile identical programs; the persistent cache turns the repeats into loads.
  # (JAX's cache reads and writes gs:// itself.)
  jax.config.update("jax_compilation_cache_dir", storage.join(storage.absolute(f.out), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if f.sweep:
    from ztt_jax.experiments.exits import sweep_ztt
    from ztt_jax.experiments.published import report_dir
    sweep_ztt(f.task, f.out, storage.join(report_dir(f.out, f.docs), "results"), f.seeds, rung=f.sweep_rung,
              log=lambda s: print(s, flush=True))
    return
  from ztt_jax.experiments.runs import run_ladder
  run_ladder(f.task, f.out, f.seeds, data_path=f.data, steps=f.steps, rungs=rungs, log=lambda s: print(s, flush=True))


def check_rung_names(f) -> None:
  for flag, names in (("--rungs", f.rungs or []), ("--sweep_rung", [f.sweep_rung])):
    unknown = [r for r in names if r not in ladder.RUNGS]
    if unknown:
      raise app.UsageError(f"{flag}={','.join(names)}: unknown rung(s) {unknown}; choose from {','.join(ladder.RUNGS)}")


def check_args(f) -> list:
  """The rungs to train, after checking every flag and building every rung's config, so that a
  mistake fails now rather than after hours of training the rungs before it."""
  if not f.task:
    raise app.UsageError(f"pass --task={'|'.join(ladder.TASKS)} (or --report)")
  names = f.rungs or list(ladder.BASE_RUNGS)
  if f.task == "text" and not f.sweep:
    if not f.data:
      raise app.UsageError("--task=text needs --data=PATH, a text file or folder (the last 10% is held out)")
    if not storage.exists(f.data):
      raise app.UsageError(f"--data={f.data}: no such file or folder; give the training text")
  if not f.sweep:
    for rung in names:
      ladder.rung_config(f.task, rung, 0, data_path=f.data, steps=f.steps)  # ConfigError: one line, exit 2
  return names


def _define_flags():
  flags.DEFINE_enum("task", None, list(ladder.TASKS), "Which ladder to train.")
  flags.DEFINE_string("data", None, "Text file for --task=text (the last 10% is held out).")
  flags.DEFINE_string("out", "runs/ablation", "Root of the ladder's work directories (OUT/TASK/RUNG_sSEED).")
  flags.DEFINE_integer("seeds", 3, "Seeds per rung (init seeds 0..N-1).", lower_bound=1)
  flags.DEFINE_integer("steps", None, "Optimizer steps per run; default: the ladder's budget.", lower_bound=1)
  flags.DEFINE_list("rungs", None, f"Rungs to train (default: {','.join(ladder.BASE_RUNGS)}; "
                    f"all: {','.join(ladder.RUNGS)}).")
  flags.DEFINE_bool("sweep", False, "Sweep the exit rules of the trained --sweep_rung of --task into DOCS/results "
                    "(embedded tasks: also accuracy by difficulty at 1x, 1.5x and 2x the trained cycles).")
  flags.DEFINE_string("sweep_rung", "ztt", "Rung whose trained models --sweep evaluates (ztt+gate adds the gate rule).")
  flags.DEFINE_bool("report", False, "Summarise OUT into DOCS/results/*.json, plot DOCS/*.png and fill the "
                    "tables of DOCS/results.md.")
  flags.DEFINE_string("docs", None, "Where --report and --sweep write (default OUT/report); --docs=docs publishes "
                      "into the repo's docs/, replacing only files the report wrote.")
  flags.DEFINE_bool("overwrite", False, "Let --report replace a published ladder built from more runs, seeds or "
                    "steps than this one.")


if __name__ == "__main__":
  from ztt_jax import cli
  _define_flags()
  cli.run(main)
