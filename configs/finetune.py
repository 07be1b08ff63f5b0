"""Fine-tune an export (e.g. a converted GPT-2 or Llama) on text: `--config=configs/finetune.py:EXPORT_DIR`.

The model section is the export's own config (EXPORT_DIR/config.json), so no model flags are needed,
and `init_from` points at it. If the export holds a `tokenizer.json` (an imported HF model that had
one), text is tokenized with it; otherwise bytes. Override anything as usual, e.g.
`--config.data.path=FILE --config.train.steps=500`.
"""
import json

from ztt_jax import storage
from ztt_jax.config import base_config


def get_config(export_dir=None):
  if not export_dir:
    raise ValueError("configs/finetune.py needs the export directory: --config=configs/finetune.py:DIR")
  cfg_path = storage.join(export_dir, "config.json")  # a local directory or gs://...
  if not storage.isfile(cfg_path):
    raise ValueError(f"{export_dir} has no config.json; pass a directory written by ztt_jax.export or "
                     "ztt_jax.convert (hf_gpt2, hf_llama).")
  model = json.loads(storage.read_text(cfg_path))["model"]
  cfg = base_config()
  for k, v in model.items():
    cfg.model[k] = tuple(v) if isinstance(v, list) else v
  cfg.init_from = storage.absolute(export_dir)
  tok = storage.join(cfg.init_from, "tokenizer.json")
  cfg.data.kind = "text"
  cfg.data.tokenizer = tok if storage.isfile(tok) else "bytes"
  cfg.data.seq_len = min(128, model["max_seq_len"])
  cfg.data.eval_fraction = 0.1
  cfg.train.steps = 300
  cfg.train.global_batch_size = 16
  cfg.train.learning_rate = 3e-4  # fine-tuning: an order below from-scratch rates
  cfg.train.warmup_steps = 20
  cfg.checkpoint.every_steps = 100
  cfg.log.every_steps = 10
  cfg.eval.every_steps = 100
  cfg.eval.max_batches = 16
  return cfg
