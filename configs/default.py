"""Default: a small ZTT on the embedded propagation task, where depth is needed by construction.

Every position's target is the digit of the newest marker before it, and attention sees only the
last 4 keys, so a digit travels at most 3 positions per layer: a position d windows from its marker
needs d layers (ztt_jax/data/propagation.py). Difficulties 1..10 are trained: the looped model's
1 + 2 x 4 + 1 = 10 layers reach all of them, vanilla-4 reaches 4, and more cycles at test time reach
farther (evaluate --max_difficulty=20 --num_cycles=8).

Early exit: the paper's zero-attention rule, with each cycle's a0 trained to say that the cycle's
read-out is already right (model.zero_attention_target_weight); untrained, a0 fires backwards here
(the hardest tokens see nothing in their window and exit first). Read-outs are taken straight from
each cycle's state (model.cycle_readout='direct'), so a token exits only once its own state holds
the answer it shows the others. Bake-off of every rule: docs/results.md.

`--config=configs/default.py:<preset>`; the presets have the same unique parameters (4 layers at one
width) and differ in how they reuse them:
  vanilla  4 unique layers, one pass                     effective depth 4
  bc       the 4 layers shared and cycled twice          effective depth 8
  htc      1 head + 2 shared middle x 4 cycles + 1 tail  effective depth 10
  ztt      htc + zero-token pool + early exit            effective depth 10  (the default)
"""
from ztt_jax.config import base_config, preset

PRESETS = {
    "vanilla": dict(variant="vanilla", num_cycles=1, exit_threshold=None, min_cycles=1, cycle_loss_weight=0.0,
                    zero_attention_target_weight=0.0),
    "bc": dict(variant="basic_cycling", num_cycles=2, exit_threshold=None, min_cycles=1,
               zero_attention_target_weight=0.0),
    "htc": dict(variant="head_tail_cycling", num_cycles=4, exit_threshold=None, min_cycles=1,
                zero_attention_target_weight=0.0),
    "ztt": dict(variant="ztt", num_cycles=4),
}
WINDOW = 4


def get_config(name="ztt"):
  overrides = preset(PRESETS, name, "ztt", "configs/default.py")
  cfg = base_config()
  cfg.model.variant = "ztt"
  cfg.model.d_model = 64
  cfg.model.num_heads = 4
  cfg.model.mlp_dim = 256
  cfg.model.n_head_layers = 1
  cfg.model.n_middle_layers = 2
  cfg.model.n_tail_layers = 1
  cfg.model.num_cycles = 4
  cfg.model.attention_window = WINDOW
  # RoPE positions: the window makes attention translation-invariant, so rows longer than the
  # trained ones (depth extrapolation) need no new positions; max_seq_len is only a limit.
  cfg.model.max_seq_len = 256
  cfg.model.token_shift = True
  cfg.model.cycle_loss_weight = 0.5
  cfg.model.cycle_readout = "direct"
  cfg.model.zero_attention_target_weight = 1.0
  cfg.model.exit_signal = "zero_attention"
  cfg.model.exit_threshold = 0.5
  cfg.model.update(overrides)
  cfg.data.kind = "propagation"
  cfg.data.window = WINDOW
  cfg.data.max_difficulty = 10
  cfg.data.seq_len = 64
  cfg.data.curriculum_examples = 12000  # difficulty 1 -> 10 over the first 750 steps
  cfg.train.steps = 1500
  cfg.train.global_batch_size = 16
  cfg.train.learning_rate = 3e-3
  cfg.train.warmup_steps = 100
  cfg.checkpoint.every_steps = 500
  cfg.log.every_steps = 100
  cfg.eval.every_steps = 500
  cfg.eval.batch_size = 64
  cfg.eval.max_batches = 8  # the whole held-out set: 512 rows
  return cfg
