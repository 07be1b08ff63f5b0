"""Data: the embedded tasks (propagation, multi-hop), text/token/ArrayRecord sources, and Grain pipelines.

Batches are dicts of numpy arrays holding this process's rows of the global batch:
`inputs` int32 [b, T], `targets` int32 [b, T] (next token), `weights` float32 [b, T] (loss mask)
and, for the embedded tasks, `difficulty` int32 [b, T] (the difficulty of each scored position: the
propagation task's windows to the marker, multi-hop's lookups; 0 where nothing is scored); b = global_batch_size // process_count.
"""
from typing import Any, Optional

import grain

from ztt_jax.data.config import SYNTHETIC_KINDS, DataConfig, multihop_min_seq_len
from ztt_jax.data.pipeline import EvalBatches, check_vocab, local_batch_size, open_source, train_dataset
from ztt_jax.data.sources import write_array_record
from ztt_jax.data.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, load_tokenizer

__all__ = [
    'BOS_ID', 'BYTE_VOCAB_SIZE', 'DataConfig', 'EOS_ID', 'EvalBatches', 'PAD_ID', 'load_tokenizer',
    'make_eval_batches', 'make_train_iterator', 'multihop_min_seq_len', 'required_vocab_size',
    'write_array_record',
]


def make_train_iterator(data_cfg: Any, *, global_batch_size: int, vocab_size: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable Grain iterator over this process's rows of each global training batch.

  Validates everything (config, files, vocab, batch split) before returning, raising
  ConfigError/DataError. Save its position with `grain.checkpoint.CheckpointSave(it)`.
  """
  cfg = DataConfig.from_any(data_cfg)
  source = open_source(cfg)
  check_vocab(source, vocab_size)
  ds = train_dataset(source, cfg, global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count)
  return iter(ds)


def make_eval_batches(data_cfg: Any, *, global_batch_size: int, vocab_size: int, process_index: int = 0,
                      process_count: int = 1, max_batches: Optional[int] = None) -> EvalBatches:
  """The held-out set as a re-iterable sequence of batches (last one padded with weight-0 rows).

  Empty when the data has no eval split (eval_fraction=0, or eval_examples=0 for multi-hop).
  """
  cfg = DataConfig.from_any(data_cfg)
  source = open_source(cfg)
  check_vocab(source, vocab_size)
  b = local_batch_size(source, global_batch_size, process_index, process_count)
  return EvalBatches(source, global_batch_size=global_batch_size, process_index=process_index,
                     local_batch=b, max_batches=max_batches)


def required_vocab_size(data_cfg: Any) -> int:
  """Smallest model vocab_size the data fits: BYTE_VOCAB_SIZE for bytes, the tokenizer's size for
  an HF tokenizer, and max id + 1 for tokens/ArrayRecord (which scans the data)."""
  cfg = DataConfig.from_any(data_cfg)
  if cfg.kind in SYNTHETIC_KINDS:
    return BYTE_VOCAB_SIZE
  if cfg.kind == 'text':
    return load_tokenizer(cfg.tokenizer).vocab_size
  return open_source(cfg).max_token_id + 1
