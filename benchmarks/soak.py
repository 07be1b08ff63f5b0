"""Soak run: a long training run checked for memory growth, checkpoint retention and save stalls.

  nice -n 10 .venv/bin/python benchmarks/soak.py                      # 2,000 steps (the full soak)
  nice -n 10 .venv/bin/python benchmarks/soak.py --steps=600          # shorter, same checks
  nice -n 10 .venv/bin/python benchmarks/soak.py --json=docs/results/soak.json

Trains configs/default.py from scratch (the work directory is emptied first) with a checkpoint every
50 steps and checkpoint.max_to_keep=3, as a separate `python -m ztt_jax.train` process, then reads
its metrics.jsonl and reports:
  - resident memory of the training process (`train/rss_mb`) at step 200 and at the last step, and
    its range after step 200 (a leak shows as steady growth, noise as a flat band);
  - the checkpoint directories left on disk (max_to_keep, and no half-written temporaries);
  - the time the training loop spent blocked in checkpoint saves (`train/checkpoint_block_sec`,
    the synchronous part of Orbax's async save), per step and per save.
Extra arguments after `--` go to the trainer, e.g. `-- --config.eval.every_steps=500`.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ztt_jax.metrics import read_metrics  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--every", type=int, default=50, help="checkpoint.every_steps")
  parser.add_argument("--keep", type=int, default=3, help="checkpoint.max_to_keep")
  parser.add_argument("--workdir", default="runs/soak")
  parser.add_argument("--json", default=None, help="also write the report here")
  parser.add_argument("extra", nargs="*", help="more train flags (after --)")
  args = parser.parse_args()

  workdir = pathlib.Path(args.workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "ztt_jax.train", "--config=configs/default.py", f"--workdir={workdir}",
         f"--config.train.steps={args.steps}", f"--config.checkpoint.every_steps={args.every}",
         f"--config.checkpoint.max_to_keep={args.keep}", f"--config.log.every_steps={args.every}",
         "--config.log.tensorboard=False", *args.extra]
  log_path = workdir.parent / f"{workdir.name}.log"
  log_path.parent.mkdir(parents=True, exist_ok=True)
  print(f"soak: {' '.join(cmd)}\nsoak: training log in {log_path}", flush=True)
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - t0
  if proc.returncode:
    sys.exit(f"soak: training failed with status {proc.returncode}; see {log_path}")

  rows = [r for r in read_metrics(str(workdir)) if "train/rss_mb" in r]
  rss = {r["step"]: r["train/rss_mb"] for r in rows}
  last = max(rss)
  at_200 = rss.get(200, rss[min(rss, key=lambda s: abs(s - 200))])
  after_200 = [v for s, v in rss.items() if s >= 200]
  blocked = sum(r["train/checkpoint_block_sec"] for r in rows)
  # A save's blocking time is logged at the next log step, so the last save (at the final step) is
  # not in the metrics: count the saves whose time was logged.
  saves_logged = len([s for s in range(args.every, last, args.every)])
  ckpt_dir = workdir / "checkpoints"
  entries = sorted(p.name for p in ckpt_dir.iterdir())
  report = {
      "command": " ".join(cmd),
      "steps": last,
      "wall_sec": round(wall, 1),
      "rss_mb_at_step_200": round(at_200, 1),
      f"rss_mb_at_step_{last}": round(rss[last], 1),
      "rss_mb_range_after_200": [round(min(after_200), 1), round(max(after_200), 1)],
      "checkpoint_dirs_at_end": entries,
      "checkpoint_block_sec_total": round(blocked, 3),
      "checkpoint_block_ms_per_step": round(1000 * blocked / last, 2),
      "checkpoint_block_ms_per_save": round(1000 * blocked / max(saves_logged, 1), 1),
      "saves_timed": saves_logged,
  }
  print(json.dumps(report, indent=2))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
  main()
