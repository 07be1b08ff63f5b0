"""The ablation ladder: one config per (task, rung, seed), all at one width and one budget.

Every rung has the same width, data, optimizer and step budget; only the layer layout differs.
`vanilla-4`, `bc`, `htc` and `ztt` hold 4 unique layer-equivalents; `vanilla-8` holds 8 and is the
compute-matched upper reference (effective depth 8, like the cycled rungs).
"""
from __future__ import annotations

from ztt_jax.config import Config, base_config, parse

RUNGS = {
    "vanilla-4": dict(variant="vanilla", n_middle_layers=2, num_cycles=1),
    "bc": dict(variant="basic_cycling", n_middle_layers=2, num_cycles=2),
    "htc": dict(variant="head_tail_cycling", n_middle_layers=2, num_cycles=3),
    "ztt": dict(variant="ztt", n_middle_layers=2, num_cycles=3),
    "vanilla-8": dict(variant="vanilla", n_middle_layers=6, num_cycles=1),
}
TASKS = ("text", "multihop")

# The budget is sized for a shared 2-core CPU (see docs/results.md); change it here, not per rung.
WIDTH = dict(d_model=64, num_heads=4, mlp_dim=192)
TASK_DEFAULTS = {
    "text": dict(seq_len=64, batch=16, steps=150, lr=3e-3),
    "multihop": dict(seq_len=32, batch=32, steps=150, lr=3e-3),
}
# Deep supervision for every rung, so the only difference between htc and ztt is the zero token,
# and the fixed-cut and confidence exit rules have a trained read-out after each cycle.
CYCLE_LOSS_WEIGHT = 0.5


def run_name(rung: str, seed: int) -> str:
  return f"{rung}_s{seed}"


def rung_config(task: str, rung: str, seed: int, *, data_path: str | None = None,
                steps: int | None = None) -> Config:
  if task not in TASKS:
    raise ValueError(f"task={task!r}: use one of {TASKS}")
  if rung not in RUNGS:
    raise ValueError(f"rung={rung!r}: use one of {list(RUNGS)}")
  d = TASK_DEFAULTS[task]
  steps = steps or d["steps"]
  cfg = base_config()
  cfg.model.update(WIDTH)
  cfg.model.update(RUNGS[rung])
  cfg.model.n_head_layers = 1
  cfg.model.n_tail_layers = 1
  cfg.model.max_seq_len = d["seq_len"]
  cfg.model.cycle_loss_weight = CYCLE_LOSS_WEIGHT
  cfg.model.exit_threshold = None  # the ladder compares full-depth models; exits are swept afterwards
  cfg.data.seq_len = d["seq_len"]
  cfg.data.seed = 0  # same data order and held-out set for every rung and seed; the seed varies init
  if task == "text":
    if not data_path:
      raise ValueError("--task=text needs --data=PATH to a text file")
    cfg.data.kind = "text"
    cfg.data.path = data_path
    cfg.data.eval_fraction = 0.1
    cfg.eval.max_batches = 8
    cfg.eval.batch_size = 32  # 256 held-out windows of 64 bytes
  else:
    cfg.data.kind = "multihop"
    cfg.data.max_hops = 3
    cfg.data.num_distractors = 1
    cfg.eval.max_batches = 8
    cfg.eval.batch_size = 64  # 512 held-out examples: every example of the eval set
  cfg.train.seed = seed
  cfg.train.steps = steps
  cfg.train.global_batch_size = d["batch"]
  cfg.train.learning_rate = d["lr"]
  cfg.train.warmup_steps = max(1, steps // 10)
  cfg.checkpoint.every_steps = max(1, steps // 2)
  cfg.checkpoint.max_to_keep = 1
  cfg.log.every_steps = max(1, steps // 10)
  cfg.log.tensorboard = False
  cfg.eval.every_steps = max(1, steps // 2)
  return parse(cfg)
