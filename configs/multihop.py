"""Default: a small ZTT on the embedded multi-hop task; ~10 minutes on 2 CPU cores (vanilla: ~4).

`--config=configs/multihop.py:<preset>`; the presets have the same unique parameters (4 layers at one
width) and differ in how they reuse them:
  vanilla  4 unique layers, one pass                     effective depth 4
  bc       the 4 layers shared and cycled twice          effective depth 8
  htc      1 head + 2 shared middle x 4 cycles + 1 tail  effective depth 10
  ztt      htc + zero-token pool + zero-attention exit   effective depth 10  (the default)

Two task options (ztt_jax/data/multihop.py; docs/data.md): `--config.data.order=topological` puts the
statements in a random order that assigns every variable before its use (default: shuffled), and
`--config.data.label_statements=True` also scores every statement in training, its value byte's
target being the variable's resolved digit (default: False, the queries alone).
"""
from ztt_jax.config import base_config, preset

PRESETS = {
    "vanilla": dict(variant="vanilla", num_cycles=1, exit_threshold=None, min_cycles=1, cycle_loss_weight=0.0),
    "bc": dict(variant="basic_cycling", num_cycles=2, exit_threshold=None, min_cycles=1),
    "htc": dict(variant="head_tail_cycling", num_cycles=4, exit_threshold=None, min_cycles=1),
    "ztt": dict(variant="ztt", num_cycles=4),
}


def get_config(name="ztt"):
  overrides = preset(PRESETS, name, "ztt", "configs/multihop.py")
  cfg = base_config()
  cfg.model.variant = "ztt"
  cfg.model.d_model = 64
  cfg.model.num_heads = 4
  cfg.model.mlp_dim = 256
  cfg.model.n_head_layers = 1
  cfg.model.n_middle_layers = 2
  cfg.model.n_tail_layers = 1
  cfg.model.num_cycles = 4
  cfg.model.max_seq_len = 64
  cfg.model.exit_threshold = 0.5
  cfg.model.cycle_loss_weight = 0.5
  # Measured (docs/results/multihop_design.md): without the shift a 4-layer vanilla stays at chance
  # on one-hop queries after 400 steps (32%); with it, 100%.
  cfg.model.token_shift = True
  cfg.model.update(overrides)
  cfg.data.kind = "multihop"
  # docs/results/multihop_design.md: 3 queries and 2 distractors per example (the longest example
  # is exactly 61 tokens); a slow curriculum (one more hop every 250 steps, all six from step 1250),
  # because the looped model needs ~400 steps of one-hop queries to form the lookup at all.
  cfg.data.seq_len = 61
  cfg.data.max_hops = 6
  cfg.data.num_queries = 3
  cfg.data.num_distractors = 2
  cfg.data.curriculum_examples = 24000
  cfg.train.steps = 1500
  cfg.train.global_batch_size = 16
  cfg.train.learning_rate = 3e-3
  cfg.train.warmup_steps = 100
  cfg.checkpoint.every_steps = 500
  cfg.log.every_steps = 100
  cfg.eval.every_steps = 500
  cfg.eval.batch_size = 64
  cfg.eval.max_batches = 8  # the whole held-out set: 512 examples, 256 queries per hop count
  return cfg
