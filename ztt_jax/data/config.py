"""`DataConfig`: the `data` section of the experiment config.

The docstring under each field is its documentation; `ztt_jax/config.py` turns the defaults into
the ml_collections schema, so field types stay simple (int/float/str/bool/Optional).
"""
import dataclasses
import typing
from typing import Any, Optional

from ztt_jax import schema
from ztt_jax.errors import ConfigError

KINDS = ('propagation', 'multihop', 'text', 'tokens', 'array_record')
# Generated in memory from (seed, index): no path, byte tokens, a per-token difficulty, scored by accuracy.
SYNTHETIC_KINDS = ('propagation', 'multihop')
MULTIHOP_ORDERS = ('shuffled', 'topological')
TOKEN_DTYPES = ('uint16', 'uint32')
# Variable names are single lowercase letters, so one example can define at most this many.
MAX_VARIABLES = 26


def multihop_query_depths(max_hops: int, num_queries: int, start: int) -> list[int]:
  """Depths of one example's queries: num_queries consecutive values of the cycle 1..max_hops,
  beginning at 1 + start. Consecutive values keep every example near-balanced over depths."""
  return [(start + q) % max_hops + 1 for q in range(num_queries)]


def multihop_max_variables(max_hops: int, num_queries: int, num_distractors: int) -> int:
  """Most variables one example defines: its query chains at the deepest start, plus distractors."""
  chains = max(sum(multihop_query_depths(max_hops, num_queries, s)) for s in range(max_hops))
  return chains + num_distractors


def multihop_min_seq_len(max_hops: int, num_distractors: int, num_queries: int = 1) -> int:
  """Shortest seq_len that fits the longest multi-hop example.

  Every statement is 3 bytes (`xy;` or `xD;`) and every query 3 (`?xD`); add BOS and EOS, and
  inputs are one shorter than the tokens.
  """
  statements = multihop_max_variables(max_hops, num_queries, num_distractors)
  return 3 * statements + 3 * num_queries + 1


def propagation_min_seq_len(window: int, max_difficulty: int) -> int:
  """Shortest seq_len whose rows hold BOS, the first marker's phase and one longest gap."""
  return max_difficulty * (window - 1) + 1 + window + 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training and eval batches come from."""

  kind: str = 'multihop'
  """One of 'propagation' or 'multihop' (embedded synthetic tasks, no file needed; see
  `ztt_jax.data.propagation` and `ztt_jax.data.multihop`), 'text' (UTF-8 file or folder),
  'tokens' (pre-tokenized .bin/.npy, uint16 or uint32) or 'array_record' (one token sequence per
  record, see `ztt_jax.data.sources.write_array_record`)."""

  path: Optional[str] = None
  """Input file or folder. Required unless kind='multihop'. Never written to: caches go to
  `cache_dir`, so it may live on a read-only filesystem."""

  seq_len: int = 64
  """Tokens per training row (inputs and targets each have this length)."""

  seed: int = 0
  """Seed of the data order: multi-hop examples, text window starts, ArrayRecord epoch shuffles."""

  max_hops: int = 4
  """Multi-hop: queries need 1..max_hops lookups, balanced (each example's depths are consecutive
  values of the cycle 1..max_hops)."""

  num_queries: int = 1
  """Multi-hop: scored queries per example, each about its own chain (so answers are independent)."""

  curriculum_examples: int = 0
  """Multi-hop training only: the deepest query grows linearly from 1 to max_hops over the first
  this many training examples (0: every example draws from 1..max_hops). Eval is unaffected."""

  order: str = 'shuffled'
  """Multi-hop: statement order. 'shuffled' (any order: a lookup may point forward) or 'topological'
  (a random order in which every variable is assigned before it is used)."""

  label_statements: bool = False
  """Multi-hop: also score every statement: the target at the value byte of `xv;` is the digit x
  resolves to, with x's depth as its difficulty (dense supervision at every depth)."""

  window: int = 4
  """Propagation: the attention window (keys per query, its own included) that difficulty is
  measured in; one layer moves a fact window - 1 positions. Must equal model.attention_window."""

  max_difficulty: int = 8
  """Propagation: the hardest position needs this many windows (layers) between it and its marker;
  markers are spaced so every difficulty 1..max_difficulty occurs in every gap."""

  num_distractors: int = 2
  """Multi-hop: extra statements per example, each a fresh literal or a copy branching off any
  variable (queried chains included) that stays within max_hops."""

  eval_examples: int = 512
  """Multi-hop: size of the held-out eval set (drawn from a separate seed stream)."""

  eval_fraction: float = 0.1
  """text/tokens/array_record: fraction held out at the end of the corpus (tokens for text and
  tokens, records for array_record) for eval. 0 disables eval."""

  tokenizer: str = 'bytes'
  """kind='text' only: 'bytes' (ids 0..255 are bytes, then PAD, BOS, EOS) or the path of a
  Hugging Face `tokenizers` JSON file."""

  cache_dir: Optional[str] = None
  """Where tokenized text is cached. None means $XDG_CACHE_HOME/ztt_jax or ~/.cache/ztt_jax."""

  token_dtype: str = 'uint16'
  """kind='tokens' with a raw .bin file: 'uint16' or 'uint32' (.npy files carry their dtype)."""

  read_threads: int = 1
  """Background threads that build batches (Grain ReadOptions.num_threads); 0 builds inline."""

  prefetch_batches: int = 2
  """Batches built ahead of the training step (Grain ReadOptions.prefetch_buffer_size)."""

  @classmethod
  def from_any(cls, x: Any) -> 'DataConfig':
    """Builds a validated DataConfig from a DataConfig, a dict or an ml_collections ConfigDict."""
    return schema.from_any(cls, x, 'data')

  def validate(self) -> None:
    """Raises ConfigError naming the first bad field and how to fix it. Touches no files."""
    self._check_types()
    if self.kind not in KINDS:
      raise ConfigError(f'data.kind={self.kind!r} is not one of {KINDS}. Set --config.data.kind to one of them.')
    if self.kind in SYNTHETIC_KINDS:
      if self.path is not None:
        raise ConfigError(
            f"data.path={self.path!r} is set but data.kind={self.kind!r} uses the embedded task and "
            "ignores it. Set data.kind to 'text', 'tokens' or 'array_record', or unset data.path.")
      if self.tokenizer != 'bytes':
        raise ConfigError(f"data.tokenizer must be 'bytes' for data.kind={self.kind!r} (its tokens are bytes).")
    elif not self.path:
      raise ConfigError(f"data.kind={self.kind!r} needs data.path. Set --config.data.path=FILE_OR_FOLDER.")
    if self.kind != 'text' and self.tokenizer != 'bytes':
      raise ConfigError(f"data.tokenizer only applies to data.kind='text'; leave it 'bytes' for {self.kind!r}.")
    if self.seq_len < 1:
      raise ConfigError(f'data.seq_len={self.seq_len} must be >= 1.')
    if self.max_hops < 1:
      raise ConfigError(f'data.max_hops={self.max_hops} must be >= 1.')
    if self.num_distractors < 0:
      raise ConfigError(f'data.num_distractors={self.num_distractors} must be >= 0.')
    if self.curriculum_examples < 0:
      raise ConfigError(f'data.curriculum_examples={self.curriculum_examples} must be >= 0 (0: no curriculum).')
    if self.num_queries < 1:
      raise ConfigError(f'data.num_queries={self.num_queries} must be >= 1.')
    if self.order not in MULTIHOP_ORDERS:
      raise ConfigError(f'data.order={self.order!r} must be one of {MULTIHOP_ORDERS}.')
    if self.kind == 'propagation':
      self._check_propagation()
    if self.kind == 'multihop':
      variables = multihop_max_variables(self.max_hops, self.num_queries, self.num_distractors)
      if variables > MAX_VARIABLES:
        raise ConfigError(
            f'data.max_hops={self.max_hops}, data.num_queries={self.num_queries} and data.num_distractors='
            f'{self.num_distractors} need up to {variables} variables (the query chains plus the '
            f'distractors), but only {MAX_VARIABLES} (a-z) exist. Lower one of them.')
      need = multihop_min_seq_len(self.max_hops, self.num_distractors, self.num_queries)
      if self.seq_len < need:
        raise ConfigError(
            f'data.seq_len={self.seq_len} is too short for the multi-hop task with max_hops={self.max_hops}, '
            f'num_queries={self.num_queries} and num_distractors={self.num_distractors}: the minimum '
            f'seq_len is {need}. Raise data.seq_len or lower data.max_hops / num_queries / num_distractors.')
    if self.eval_examples < 0:
      raise ConfigError(f'data.eval_examples={self.eval_examples} must be >= 0.')
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ConfigError(f'data.eval_fraction={self.eval_fraction} must be in [0, 1).')
    if self.token_dtype not in TOKEN_DTYPES:
      raise ConfigError(f'data.token_dtype={self.token_dtype!r} must be one of {TOKEN_DTYPES}.')
    if self.read_threads < 0 or self.prefetch_batches < 0:
      raise ConfigError('data.read_threads and data.prefetch_batches must be >= 0.')

  def _check_propagation(self) -> None:
    if self.window < 2:
      raise ConfigError(f'data.window={self.window} must be >= 2: a window of one key moves nothing.')
    if self.max_difficulty < 1:
      raise ConfigError(f'data.max_difficulty={self.max_difficulty} must be >= 1.')
    need = propagation_min_seq_len(self.window, self.max_difficulty)
    if self.seq_len < need:
      raise ConfigError(
          f'data.seq_len={self.seq_len} is too short for the propagation task with window={self.window} and '
          f'max_difficulty={self.max_difficulty}: a row must hold one whole gap between markers, so the '
          f'minimum seq_len is {need}. Raise data.seq_len or lower data.max_difficulty.')

  def _check_types(self) -> None:
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      allowed = typing.get_args(f.type) or (f.type,)
      allowed = tuple(type(None) if a is None else a for a in allowed)
      if float in allowed:
        allowed += (int,)
      ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
      if not ok:
        names = ' or '.join(a.__name__ for a in allowed)
        raise ConfigError(f'data.{f.name}={value!r} has type {type(value).__name__}; expected {names}.')
