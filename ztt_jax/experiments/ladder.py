"""The ablation ladder: one config per (task, rung, seed), all at one width and one budget per task.

Every rung of a task has the same width, data, optimizer and step budget; only the layer layout (and,
for the recipe rungs, one looped-training recipe) differs. `vanilla-4`, `bc`, `htc` and `ztt` hold 4
unique layer-equivalents; `vanilla-8` holds 8 and is the compute-matched upper reference (effective
depth 8, like the cycled rungs). The `ztt+...` rungs are the ztt rung plus one recipe of
docs/architecture.md's "looped-training recipes", to pick the best one by measurement.
"""
from __future__ import annotations

from ztt_jax.config import Config, base_config, parse
from ztt_jax.errors import ConfigError

_ZTT = dict(variant="ztt", n_middle_layers=2, num_cycles=3)
RUNGS = {
    "vanilla-4": dict(model=dict(variant="vanilla", n_middle_layers=2, num_cycles=1)),
    "bc": dict(model=dict(variant="basic_cycling", n_middle_layers=2, num_cycles=2)),
    "htc": dict(model=dict(variant="head_tail_cycling", n_middle_layers=2, num_cycles=3)),
    "ztt": dict(model=_ZTT),
    "vanilla-8": dict(model=dict(variant="vanilla", n_middle_layers=6, num_cycles=1)),
    # recipes (model.* / train.* of the same names)
    "ztt+inject": dict(model=dict(_ZTT, input_injection="embed")),
    "ztt+gate": dict(model=dict(_ZTT, exit_gate=True)),
    "ztt+random": dict(model=_ZTT, train=dict(cycles_distribution="poisson", cycles_mean=3.0, cycles_max=5)),
    # truncated backprop: gradients through the last 2 cycles only (Huginn's recipe, scaled down)
    "ztt+truncated": dict(model=dict(_ZTT, backprop_cycles=2)),
    # the paper's zero-attention exit, with each cycle's a0 trained to predict that its read-out is right
    "ztt+a0target": dict(model=dict(_ZTT, zero_attention_target_weight=1.0)),
    # cheaper deep supervision: each cycle before the last read out through the final norm only, not
    # the tail (text; the propagation task reads out so on every rung); or only every 2nd cycle and
    # the last read out
    "ztt+direct": dict(model=dict(_ZTT, cycle_readout="direct")),
    "ztt+every2": dict(model=dict(_ZTT, cycle_loss_every=2)),
}
BASE_RUNGS = ("vanilla-4", "bc", "htc", "ztt", "vanilla-8")
TASKS = ("text", "multihop", "propagation")

# Text: nanoGPT's CPU "baby" budget (shakespeare_char: block 64, batch 12, 2000 iters, n_embd 128,
# 4 heads), byte-level, the last 10% held out. The embedded tasks: the width, data, model extras
# and schedule of their configs, configs/multihop.py (1..6 hops) and configs/default.py
# (propagation, difficulty 1..10 under a window of 4); tests/test_experiments_report.py checks they
# stay equal. The package builds them itself: configs/ is not installed with it. Change a budget
# here, not per rung.
TASK_DEFAULTS = {
    "text": dict(width=dict(d_model=128, num_heads=4, mlp_dim=512), seq_len=64, batch=12, steps=2000,
                 lr=3e-3, warmup=100),
    "multihop": dict(width=dict(d_model=64, num_heads=4, mlp_dim=256), seq_len=61, batch=16, steps=1500,
                     lr=3e-3, warmup=100, data=dict(kind="multihop", max_hops=6, num_queries=3,
                                                    num_distractors=2, curriculum_examples=24000),
                     # without the shift no rung learns even one lookup (docs/results/multihop_design.md)
                     model=dict(token_shift=True, max_seq_len=64), cycles=4),
    "propagation": dict(width=dict(d_model=64, num_heads=4, mlp_dim=256), seq_len=64, batch=16, steps=1500,
                        lr=3e-3, warmup=100, data=dict(kind="propagation", window=4, max_difficulty=10,
                                                       curriculum_examples=12000),
                        # max_seq_len past seq_len: depth extrapolation evaluates longer rows (2D)
                        model=dict(attention_window=4, token_shift=True, max_seq_len=256, cycle_readout="direct"),
                        # the cycled rungs run configs/default.py's C = 4 (10 layers, the reach of D = 10);
                        # every seed also draws its own data, so the result holds beyond one data seed
                        cycles=4, seed_data=True),
}
# An embedded task's name is its data.kind, so data.config.SYNTHETIC_KINDS names them.
# Deep supervision for every rung, so the only difference between htc and ztt is the zero token,
# and the fixed-cut and confidence exit rules have a trained read-out after each cycle.
CYCLE_LOSS_WEIGHT = 0.5


def run_name(rung: str, seed: int) -> str:
  return f"{rung}_s{seed}"


def result_stem(task: str, rung: str) -> str:
  """Name stem of a rung's sweep / depth JSON: the plain ztt keeps the task's name, so a recipe
  rung's sweep never overwrites it."""
  return task if rung == "ztt" else f"{task}_{rung}"


def rung_config(task: str, rung: str, seed: int, *, data_path: str | None = None,
                steps: int | None = None) -> Config:
  if task not in TASKS:
    raise ConfigError(f"task={task!r}: use one of {TASKS}")
  if rung not in RUNGS:
    raise ConfigError(f"rung={rung!r}: use one of {list(RUNGS)}")
  d = TASK_DEFAULTS[task]
  steps = steps or d["steps"]
  cfg = base_config()
  cfg.model.update(d["width"])
  cfg.model.update(RUNGS[rung]["model"])
  cfg.train.update(RUNGS[rung].get("train", {}))
  cfg.model.n_head_layers = 1
  cfg.model.n_tail_layers = 1
  cfg.model.max_seq_len = d["seq_len"]
  if "cycles" in d and cfg.model.variant in ("head_tail_cycling", "ztt"):
    cfg.model.num_cycles = d["cycles"]
    if cfg.train.cycles_distribution != "none":
      cfg.train.cycles_mean, cfg.train.cycles_max = float(d["cycles"]), d["cycles"] + 2
  cfg.model.cycle_loss_weight = CYCLE_LOSS_WEIGHT
  cfg.model.exit_threshold = None  # the ladder compares full-depth models; exits are swept afterwards
  if task == "text":
    if not data_path:
      raise ConfigError("--task=text needs --data=PATH to a text file")
    cfg.data.kind = "text"
    cfg.data.path = data_path
    cfg.data.eval_fraction = 0.1
    cfg.eval.max_batches = 8
    cfg.eval.batch_size = 32  # 256 held-out windows of 64 bytes (nanoGPT's protocol runs after training)
  else:
    cfg.data.update(d["data"])
    cfg.model.update(d["model"])
    # A shorter budget still reaches the hardest difficulty: the curriculum ends by the last step.
    cfg.data.curriculum_examples = min(cfg.data.curriculum_examples, steps * d["batch"])
    cfg.eval.max_batches = 8
    cfg.eval.batch_size = 64  # 512 held-out examples (rows): every example of the eval set
  cfg.data.seq_len = d["seq_len"]
  # Same data order and held-out set for every rung and seed (the seed varies init), unless the task
  # asks for a data seed per seed.
  cfg.data.seed = seed if d.get("seed_data") else 0
  cfg.train.seed = seed
  cfg.train.steps = steps
  cfg.train.global_batch_size = d["batch"]
  cfg.train.learning_rate = d["lr"]
  cfg.train.warmup_steps = min(d["warmup"], max(1, steps // 10))
  cfg.checkpoint.every_steps = max(1, steps // 2)
  cfg.checkpoint.max_to_keep = 1
  cfg.log.every_steps = max(1, steps // 10)
  cfg.log.tensorboard = False
  cfg.eval.every_steps = max(1, steps // 4)
  return parse(cfg)
