"""Pod-scale ZTTs for ahead-of-time compile checks (`ztt_jax.compile_check`, docs/scaling.md).

`--config=configs/scale.py:<preset>`; each is a Llama-form ZTT (RMSNorm, RoPE, SwiGLU, grouped-query
attention, untied 128k vocabulary) at the width of the Llama model its compute matches:
  1b  Llama-3.2-1B width (d 2048, 32 heads over 8 kv heads, mlp 8192):
      1 head + 4 shared x 4 cycles + 1 tail = 18 applied layers (Llama-3.2-1B has 16)
  8b  Llama-3-8B width (d 4096, 32 heads over 8 kv heads, mlp 14336):
      1 head + 8 shared x 4 cycles + 1 tail = 34 applied layers (Llama-3-8B has 32)
Both train on 8,192-token rows in bfloat16 with float32 master weights, remat of every scanned
layer, the chunked (flash-style) attention, the blockwise loss and deep supervision at 0.5. The
data section is a stand-in: compile_check reads no data, so the token file named here need not
exist; train on real data with --config.data.path=... and the tokenizer whose vocabulary it has.
"""
from ztt_jax.config import base_config, preset

PRESETS = {
    "1b": dict(d_model=2048, num_heads=32, num_kv_heads=8, mlp_dim=8192, n_middle_layers=4),
    "8b": dict(d_model=4096, num_heads=32, num_kv_heads=8, mlp_dim=14336, n_middle_layers=8),
}
VOCAB = 128256  # Llama 3's
SEQ_LEN = 8192


def get_config(name="1b"):
  overrides = preset(PRESETS, name, "1b", "configs/scale.py")
  cfg = base_config()
  m = cfg.model
  m.variant = "ztt"
  m.update(overrides)
  m.vocab_size = VOCAB
  m.n_head_layers = 1
  m.n_tail_layers = 1
  m.num_cycles = 4
  m.max_seq_len = SEQ_LEN
  m.rope_theta = 500000.0
  m.tie_embeddings = False
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat_policy = "nothing_saveable"
  m.attention_impl = "chunked"
  m.attention_block_size = 512
  m.cycle_loss_weight = 0.5
  m.exit_threshold = 0.5
  cfg.data.kind = "tokens"
  cfg.data.path = "tokens.bin"
  cfg.data.seq_len = SEQ_LEN
  cfg.train.global_batch_size = 64
  cfg.train.learning_rate = 3e-4
  cfg.mesh.shape = (1, -1, 1)  # FSDP over every chip; see docs/scaling.md for tensor parallelism
  return cfg
