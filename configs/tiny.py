"""Tiny ZTT on the multi-hop task: seconds per run. Used by the tests and for smoke checks."""
from ztt_jax.config import base_config


def get_config(arg=None):
  del arg
  cfg = base_config()
  cfg.model.variant = "ztt"
  cfg.model.d_model = 32
  cfg.model.num_heads = 2
  cfg.model.mlp_dim = 64
  cfg.model.n_middle_layers = 2
  cfg.model.num_cycles = 3
  cfg.model.max_seq_len = 48
  cfg.model.exit_threshold = 0.5
  cfg.model.cycle_loss_weight = 0.5
  cfg.data.kind = "multihop"
  cfg.data.seq_len = 48
  cfg.data.max_hops = 3
  cfg.train.steps = 6
  cfg.train.global_batch_size = 16
  cfg.train.warmup_steps = 2
  cfg.checkpoint.every_steps = 3
  cfg.log.every_steps = 1
  cfg.eval.every_steps = 3
  cfg.eval.max_batches = 1
  return cfg
