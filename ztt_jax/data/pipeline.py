"""Grain pipelines: this process's rows of each global batch, in an order fixed by global index.

Global batch i, row n is example i * global_batch_size + n. The train dataset is a MapDataset over
global batch indices, so its iterator state ({'next_index': i}) is the same on every process and
does not depend on the process count: a checkpoint resumes with the same data on any host count.
"""
import dataclasses
from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

from ztt_jax import storage
from ztt_jax.data import multihop, propagation, sources, text
from ztt_jax.data.config import DataConfig
from ztt_jax.data.tokenizer import load_tokenizer
from ztt_jax.errors import DataError
from ztt_jax.partitioning import check_batch_split

# Enough global batches for any run; indices stay far below int64 overflow.
_MAX_BATCHES = 1 << 40


class Source(Protocol):
  name: str
  seq_len: int
  num_eval: int
  has_difficulty: bool
  max_token_id: int

  def train_example(self, index: int) -> dict: ...
  def eval_example(self, index: int) -> dict: ...
  def pad_example(self) -> dict: ...


def local_data(cfg: DataConfig) -> DataConfig:
  """`cfg` with a data.path in an object store (gs://...) replaced by a local copy of it
  (storage.local_copy: made once, reused while the objects are unchanged): ArrayRecord and the
  memory-mapped token files read local files only. The run's config keeps the URL."""
  if cfg.kind in ('text', 'tokens', 'array_record') and cfg.path and storage.is_url(cfg.path):
    try:
      return dataclasses.replace(cfg, path=storage.local_copy(cfg.path, cfg.cache_dir))
    except FileNotFoundError:
      raise DataError(f'data.path {cfg.path!r} does not exist: no object has that name or prefix. Set '
                      '--config.data.path to an existing file or folder in the bucket.') from None
  return cfg


def open_source(cfg: DataConfig) -> Source:
  """Opens (and for text, tokenizes once) the configured data; raises DataError on bad input."""
  cfg = local_data(cfg)
  if cfg.kind == 'propagation':
    return propagation.PropagationSource(cfg)
  if cfg.kind == 'multihop':
    return multihop.MultiHopSource(cfg)
  common = dict(seq_len=cfg.seq_len, seed=cfg.seed, eval_fraction=cfg.eval_fraction)
  if cfg.kind == 'text':
    tok = load_tokenizer(cfg.tokenizer)
    cache = text.build_token_cache(cfg.path, tok, cfg.cache_dir)
    return sources.WindowSource(cache.tokens(), pad_id=tok.pad_id, max_id=cache.max_id,
                                name=f'text data.path {cfg.path!r}', **common)
  if cfg.kind == 'tokens':
    tokens = sources.load_token_file(cfg.path, cfg.token_dtype)
    return sources.WindowSource(tokens, pad_id=0, max_id=sources.token_file_max_id(cfg.path, cfg.token_dtype),
                                name=f'token file data.path {cfg.path!r}', **common)
  if cfg.kind == 'array_record':
    return sources.ArrayRecordSource(cfg.path, **common)
  raise DataError(f'Unknown data.kind {cfg.kind!r}.')  # DataConfig.validate rejects this earlier.


def check_vocab(source: Source, vocab_size: int) -> None:
  if source.max_token_id >= vocab_size:
    raise DataError(
        f'{source.name} contains token id {source.max_token_id}, but the model vocab_size is {vocab_size}. '
        f'Raise model.vocab_size to at least {source.max_token_id + 1}, or fix the tokenizer/data.')


def local_batch_size(source: Source, global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is out of range for process_count={process_count} '
                    f'(reading {source.name}).')
  check_batch_split(global_batch_size, process_count)
  return global_batch_size // process_count


def _stack(examples: list) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class TrainRows:
  """Global batch index -> this process's rows. A class (not a closure) so it pickles."""

  def __init__(self, source: Source, global_batch_size: int, process_index: int, local_batch: int):
    self.source, self.global_batch_size = source, global_batch_size
    self.first_row, self.local_batch = process_index * local_batch, local_batch

  def __call__(self, batch_index: int) -> dict:
    start = int(batch_index) * self.global_batch_size + self.first_row
    return _stack([self.source.train_example(start + n) for n in range(self.local_batch)])


def train_dataset(source: Source, cfg: DataConfig, *, global_batch_size: int, process_index: int,
                  process_count: int) -> grain.IterDataset:
  b = local_batch_size(source, global_batch_size, process_index, process_count)
  rows = TrainRows(source, global_batch_size, process_index, b)
  options = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches)
  return grain.MapDataset.range(_MAX_BATCHES).map(rows).to_iter_dataset(options)


class EvalBatches(Sequence):
  """This process's rows of every eval batch; re-iterable, built lazily.

  The last global batch is filled with weight-0 pad rows (difficulty 0 for the embedded tasks) instead of
  dropping examples, so every held-out example is scored exactly once.
  """

  def __init__(self, source: Source, *, global_batch_size: int, process_index: int, local_batch: int,
               max_batches: int | None):
    self.source, self.global_batch_size, self.local_batch = source, global_batch_size, local_batch
    self.first_row = process_index * local_batch
    n = -(-source.num_eval // global_batch_size)
    self._len = n if max_batches is None else min(n, max_batches)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    if not -self._len <= i < self._len:
      raise IndexError(i)
    i %= self._len
    start = i * self.global_batch_size + self.first_row
    return _stack([self.source.eval_example(k) if k < self.source.num_eval else self.source.pad_example()
                   for k in range(start, start + self.local_batch)])
