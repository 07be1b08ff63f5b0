"""Default: a small ZTT on the embedded multi-hop task; trains in a few minutes on 2 CPU cores."""
from ztt_jax.config import base_config


def get_config(arg=None):
  del arg
  cfg = base_config()
  cfg.model.variant = "ztt"
  cfg.model.d_model = 64
  cfg.model.num_heads = 4
  cfg.model.mlp_dim = 256
  cfg.model.n_head_layers = 1
  cfg.model.n_middle_layers = 2
  cfg.model.n_tail_layers = 1
  cfg.model.num_cycles = 4
  cfg.model.max_seq_len = 32
  cfg.model.exit_threshold = 0.5
  cfg.model.cycle_loss_weight = 0.5
  cfg.data.kind = "multihop"
  cfg.data.seq_len = 32
  cfg.data.max_hops = 3
  cfg.data.num_distractors = 1
  cfg.train.steps = 300
  cfg.train.global_batch_size = 32
  cfg.train.learning_rate = 3e-3
  cfg.train.warmup_steps = 30
  cfg.checkpoint.every_steps = 100
  cfg.log.every_steps = 25
  cfg.eval.every_steps = 100
  cfg.eval.max_batches = 8
  return cfg
