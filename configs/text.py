"""Byte-level LM on any text file: `--config=configs/text.py:<preset> --config.data.path=FILE`.

Presets (`vanilla`, `bc`, `htc`, `ztt`) have the same unique parameters: 4 layers at one width.
  vanilla  4 unique layers, one pass                     effective depth 4
  bc       the 4 layers shared and cycled twice          effective depth 8
  htc      1 head + 2 shared middle x 3 cycles + 1 tail  effective depth 8
  ztt      htc + zero-token pool + zero-attention exit   effective depth 8
"""
from ztt_jax.config import base_config, preset

PRESETS = {
    "vanilla": dict(variant="vanilla", num_cycles=1),
    "bc": dict(variant="basic_cycling", num_cycles=2),
    "htc": dict(variant="head_tail_cycling", num_cycles=3),
    "ztt": dict(variant="ztt", num_cycles=3),
}


def get_config(name="ztt"):
  overrides = preset(PRESETS, name, "ztt", "configs/text.py")
  cfg = base_config()
  cfg.model.update(overrides)
  cfg.model.d_model = 128
  cfg.model.num_heads = 4
  cfg.model.mlp_dim = 384
  cfg.model.n_head_layers = 1
  cfg.model.n_middle_layers = 2
  cfg.model.n_tail_layers = 1
  cfg.model.max_seq_len = 256
  cfg.data.kind = "text"
  cfg.data.seq_len = 128
  cfg.data.eval_fraction = 0.1
  cfg.train.steps = 1000
  cfg.train.global_batch_size = 16
  cfg.train.learning_rate = 2e-3
  cfg.checkpoint.every_steps = 250
  cfg.log.every_steps = 50
  cfg.eval.every_steps = 250
  cfg.eval.max_batches = 16
  return cfg
