"""Random-access example sources over token data: windows of a flat token array, and ArrayRecord.

Every source maps a global example index to one example dict (`inputs`, `targets`, `weights`),
deterministically from (seed, index), so any process can build any row without coordination.

ArrayRecord encoding: each record is one token sequence stored as little-endian uint32 bytes
(`np.asarray(seq, '<u4').tobytes()`); `write_array_record` writes such files.
"""
import functools
import os
import pathlib
from typing import Iterable, Optional

import numpy as np

from ztt_jax.errors import DataError

TOKEN_EXTENSIONS = ('.bin', '.npy')
_SCAN_CHUNK = 1 << 24


def example_from_tokens(seq: np.ndarray, seq_len: int, pad_id: int) -> dict:
  """Next-token example from up to seq_len+1 tokens; missing positions are padded with weight 0."""
  n = min(len(seq), seq_len + 1)
  padded = np.full(seq_len + 1, pad_id, np.int32)
  padded[:n] = seq[:n]
  weights = np.zeros(seq_len, np.float32)
  weights[:max(n - 1, 0)] = 1.0
  return {'inputs': padded[:-1], 'targets': padded[1:], 'weights': weights}


def load_token_file(path: str, token_dtype: str) -> np.ndarray:
  """Memory-maps a pre-tokenized `.npy` (its own dtype) or raw `.bin` (`token_dtype`) file."""
  if not os.path.exists(path):
    raise DataError(f'data.path {path!r} does not exist. Set --config.data.path to a .bin or .npy token file.')
  if not os.path.isfile(path):
    raise DataError(f'data.path {path!r} is not a file. data.kind=tokens needs one .bin or .npy file.')
  ext = os.path.splitext(path)[1].lower()
  if ext not in TOKEN_EXTENSIONS:
    raise DataError(
        f"data.path {path!r} has extension {ext!r}; data.kind='tokens' reads .bin (raw, dtype from "
        "data.token_dtype) or .npy files. Rename or convert it, or use data.kind='text' for text.")
  if os.path.getsize(path) == 0:
    raise DataError(f'data.path {path!r} is an empty file. Write the tokens into it, or point data.path elsewhere.')
  if ext == '.npy':
    try:
      arr = np.load(path, mmap_mode='r')
    except Exception as e:  # numpy raises ValueError/OSError/pickle errors for bad headers.
      raise DataError(f'data.path {path!r} is not a readable .npy file ({e}). Save it with np.save.') from e
    if arr.dtype not in (np.uint16, np.uint32):
      raise DataError(f'data.path {path!r} has dtype {arr.dtype}; token files must be uint16 or uint32. '
                      'Convert it, e.g. np.save(path, arr.astype(np.uint32)).')
    if arr.ndim != 1:
      raise DataError(f'data.path {path!r} has shape {arr.shape}; token files must be 1-D. '
                      'Save arr.reshape(-1) instead.')
    return arr
  dtype = np.dtype(token_dtype)
  if os.path.getsize(path) % dtype.itemsize:
    raise DataError(f'data.path {path!r} has {os.path.getsize(path)} bytes, not a multiple of {dtype.itemsize}, '
                    f'so it is not a raw {dtype.name} file. Set data.token_dtype to its real dtype.')
  return np.memmap(path, dtype=dtype, mode='r')


def max_token_id(tokens: np.ndarray) -> int:
  # Chunked so a multi-GB memmap is scanned without loading it whole.
  return max((int(tokens[i:i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK)), default=-1)


def _file_signature(files: Iterable[str]) -> tuple:
  return tuple((os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=16)
def _token_file_max_id(signature: tuple, token_dtype: str) -> int:
  # Train and eval both open the source; the signature makes the second open skip the scan.
  return max_token_id(load_token_file(signature[0][0], token_dtype))


def token_file_max_id(path: str, token_dtype: str) -> int:
  return _token_file_max_id(_file_signature([path]), token_dtype)


class WindowSource:
  """Train: random windows of the head split. Eval: contiguous stride-seq_len windows of the tail.

  The tail (eval_fraction of the tokens, at least seq_len+1) is never seen in training: a
  training window ends at most at the last head token, and eval targets start after it.
  """

  has_difficulty = False

  def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int, eval_fraction: float,
               pad_id: int, name: str, max_id: Optional[int] = None):
    n, T = len(tokens), seq_len
    self.name = name
    if n < T + 1:
      raise DataError(f'{name} has {n} tokens, shorter than data.seq_len + 1 = {T + 1}. '
                      'Lower data.seq_len or use a longer corpus.')
    num_heldout = 0 if eval_fraction == 0 else max(T + 1, int(round(n * eval_fraction)))
    if n - num_heldout < T + 1:
      raise DataError(
          f'{name} has {n} tokens: holding out {num_heldout} for eval (data.eval_fraction={eval_fraction}) '
          f'leaves {n - num_heldout}, fewer than data.seq_len + 1 = {T + 1} for training. Use a corpus of at '
          f'least {2 * (T + 1)} tokens, lower data.seq_len, or set data.eval_fraction=0.')
    self.tokens, self.seq_len, self.seed, self.pad_id = tokens, T, seed, pad_id
    self.num_train_tokens = n - num_heldout
    # Eval windows advance by T so their targets tile the tail exactly once.
    self.num_eval = 0 if num_heldout == 0 else -(-(num_heldout - 1) // T)
    self.max_token_id = max_token_id(tokens) if max_id is None else max_id

  def train_start(self, index: int) -> int:
    rng = np.random.default_rng([self.seed, index])
    return int(rng.integers(0, self.num_train_tokens - self.seq_len))

  def eval_start(self, index: int) -> int:
    return self.num_train_tokens + index * self.seq_len

  def train_example(self, index: int) -> dict:
    s = self.train_start(index)
    return example_from_tokens(self.tokens[s:s + self.seq_len + 1], self.seq_len, self.pad_id)

  def eval_example(self, index: int) -> dict:
    s = self.eval_start(index)
    return example_from_tokens(self.tokens[s:s + self.seq_len + 1], self.seq_len, self.pad_id)

  def pad_example(self) -> dict:
    return example_from_tokens(np.zeros(0, np.int32), self.seq_len, self.pad_id)


def write_array_record(path: str, sequences: Iterable) -> int:
  """Writes one record per token sequence (little-endian uint32); returns the record count."""
  from array_record.python import array_record_module as arm

  writer = arm.ArrayRecordWriter(str(path), 'group_size:1')
  count = 0
  try:
    for seq in sequences:
      seq = np.asarray(seq)
      if seq.size and (seq.min() < 0 or seq.max() >= 1 << 32):
        raise ValueError(f'record {count}: token ids must be in [0, 2**32)')
      writer.write(seq.astype('<u4').tobytes())
      count += 1
  finally:
    writer.close()
  return count


def array_record_files(path: str) -> list[str]:
  """The file itself, or every `*.array_record*` file in the folder, sorted."""
  p = pathlib.Path(path)
  if not p.exists():
    raise DataError(f'data.path {path!r} does not exist. Set --config.data.path to an ArrayRecord file or folder.')
  if p.is_dir():
    files = sorted(str(f) for f in p.iterdir() if '.array_record' in f.name and f.is_file())
    if not files:
      raise DataError(f'data.path {path!r} is a folder without *.array_record files. Write some with '
                      'ztt_jax.data.write_array_record, or point data.path at one.')
  else:
    files = [str(p)]
  for f in files:
    if os.path.getsize(f) == 0:
      raise DataError(f'ArrayRecord file {f!r} (data.path) is empty. Rewrite it with ztt_jax.data.write_array_record.')
  return files


def decode_record(raw: bytes, index: int, name: str) -> np.ndarray:
  if len(raw) % 4:
    raise DataError(f'{name}: record {index} has {len(raw)} bytes, not a multiple of 4, so it is not a '
                    'little-endian uint32 token sequence. Write records with ztt_jax.data.write_array_record.')
  return np.frombuffer(raw, '<u4')


@functools.lru_cache(maxsize=4)
def _scan_records(signature: tuple) -> tuple[int, tuple]:
  """(max id, record lengths): one pass at startup finds out-of-vocab ids before any compile.
  Cached on the files' (path, size, mtime) so that train and eval share one pass."""
  import grain

  reader = grain.sources.ArrayRecordDataSource([s[0] for s in signature])
  max_id, lengths = -1, []
  name = f'ArrayRecord file(s) {[s[0] for s in signature]}'
  for i in range(len(reader)):
    seq = decode_record(reader[i], i, name)
    lengths.append(len(seq))
    if len(seq):
      max_id = max(max_id, int(seq.max()))
  return max_id, tuple(lengths)


class ArrayRecordSource:
  """Train: the head records in a fresh permutation every epoch, randomly cropped to seq_len+1.
  Eval: the tail records (eval_fraction of them), each cut into stride-seq_len windows."""

  has_difficulty = False

  def __init__(self, path: str, *, seq_len: int, seed: int, eval_fraction: float, pad_id: int = 0):
    import grain

    files = array_record_files(path)
    self.name = f'ArrayRecord data.path {path!r}'
    try:
      self._reader = grain.sources.ArrayRecordDataSource(files)
      n = len(self._reader)
    except Exception as e:  # The C++ reader raises generic errors for foreign files.
      raise DataError(f'{self.name} could not be read as ArrayRecord ({e}). Write it with '
                      'ztt_jax.data.write_array_record.') from e
    if n == 0:
      raise DataError(f'{self.name} holds no records. Write token sequences with ztt_jax.data.write_array_record.')
    num_heldout = 0 if eval_fraction == 0 else max(1, int(round(n * eval_fraction)))
    if n - num_heldout < 1:
      raise DataError(f'{self.name} has {n} record(s); holding out {num_heldout} for eval leaves none for '
                      'training. Add records or set data.eval_fraction=0.')
    self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
    self.num_train_records = n - num_heldout
    self.max_token_id, lengths = _scan_records(_file_signature(files))
    # (record, offset) of every eval window; records too short to predict anything are skipped.
    self._eval_windows = [(r, off) for r in range(self.num_train_records, n)
                          for off in range(0, max(lengths[r] - 1, 0), seq_len)]
    self.num_eval = len(self._eval_windows)

  def _record(self, i: int) -> np.ndarray:
    return decode_record(self._reader[i], i, self.name)

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_train_records)

  def train_example(self, index: int) -> dict:
    epoch, j = divmod(index, self.num_train_records)
    seq = self._record(int(self._permutation(epoch)[j]))
    extra = len(seq) - (self.seq_len + 1)
    if extra > 0:
      start = int(np.random.default_rng([self.seed, 1 << 32, index]).integers(0, extra + 1))
      seq = seq[start:start + self.seq_len + 1]
    return example_from_tokens(seq, self.seq_len, self.pad_id)

  def eval_example(self, index: int) -> dict:
    r, off = self._eval_windows[index]
    return example_from_tokens(self._record(r)[off:off + self.seq_len + 1], self.seq_len, self.pad_id)

  def pad_example(self) -> dict:
    return example_from_tokens(np.zeros(0, np.int32), self.seq_len, self.pad_id)
