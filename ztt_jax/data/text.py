"""Tokenize a UTF-8 file or folder once into a memory-mapped `.npy` cache.

The cache lives in `cache_dir` (never next to the input, which may be read-only) under a name
derived from the absolute path, size and mtime of every input file and the tokenizer's identity,
so editing a file or switching tokenizer rebuilds it and nothing else does. With the byte
tokenizer every file is followed by EOS so that documents do not run into each other.

Every input file must be UTF-8 without NUL bytes: a binary file (an executable, an image, a
compressed archive) would otherwise train without a word. The first bad file is named with the
byte offset of the problem. The files and the token count read are logged at INFO.
"""
import codecs
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Optional, Union

import numpy as np

from ztt_jax import storage
from ztt_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from ztt_jax.errors import DataError

log = logging.getLogger(__name__)

# v2: inputs are checked (UTF-8, no NUL) while the cache is built; a v1 cache may hold binary input.
_FORMAT = 'ztt-text-cache-v2'
_CHUNK_BYTES = 1 << 24
_HF_LINES_PER_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class TokenCache:
  path: str
  """The cache `.npy` file (uint16, or uint32 when the vocab needs it)."""
  source: str
  num_tokens: int
  max_id: int
  built: bool
  """True if this call tokenized the input; False if an existing cache was reused."""

  def tokens(self) -> np.ndarray:
    return np.load(self.path, mmap_mode='r')


def default_cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ztt_jax')


def list_text_files(path: str) -> list[pathlib.Path]:
  """The file itself, or every non-hidden file under the folder in sorted order."""
  p = pathlib.Path(path)
  if not p.exists():
    raise DataError(f'data.path {path!r} does not exist. Set --config.data.path to an existing text file or folder.')
  if p.is_file():
    if p.stat().st_size == 0:
      raise DataError(f'data.path {path!r} is an empty file. Point data.path at a file with text in it.')
    return [p]
  files = sorted(f for f in p.rglob('*')
                 if f.is_file() and not any(part.startswith('.') for part in f.relative_to(p).parts))
  if not any(f.stat().st_size for f in files):
    raise DataError(f'data.path {path!r} is a folder with no non-empty files. Add text files to it or '
                    'point data.path at a text file.')
  return [f for f in files if f.stat().st_size]


def _cache_key(files: list[pathlib.Path], tokenizer) -> str:
  h = hashlib.sha256(f'{_FORMAT}\n{tokenizer.identity}\n'.encode())
  for f in files:
    st = f.stat()
    h.update(f'{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:24]


def build_token_cache(path: str, tokenizer: Union[ByteTokenizer, HFTokenizer],
                      cache_dir: Optional[str] = None) -> TokenCache:
  """Returns the cache for `path`, tokenizing only if no valid cache exists yet."""
  if cache_dir and storage.is_url(cache_dir):
    raise DataError(f'data.cache_dir={cache_dir!r} is in an object store; the token cache is memory-mapped, '
                    'so it must be a local folder. Leave data.cache_dir unset or give a local path.')
  files = list_text_files(path)
  cache_dir = cache_dir or default_cache_dir()
  key = _cache_key(files, tokenizer)
  npy = os.path.join(cache_dir, f'text-{key}.npy')
  meta_path = npy[:-4] + '.json'
  # The sidecar is written last, so its presence means the .npy is complete.
  if os.path.exists(meta_path) and os.path.exists(npy):
    with open(meta_path) as f:
      meta = json.load(f)
    _log_read(path, files, meta['num_tokens'], f'the token cache {npy}')
    return TokenCache(npy, path, meta['num_tokens'], meta['max_id'], built=False)

  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:
    raise DataError(f'Cannot create the token cache folder {cache_dir!r} for {path!r} ({e}). '
                    'Set --config.data.cache_dir to a writable folder.') from e
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  # A per-process tmp name lets several processes build the same cache without clobbering.
  tmp = f'{npy}.{os.getpid()}.tmp.npy'
  try:
    if isinstance(tokenizer, ByteTokenizer):
      num_tokens, max_id = _write_bytes(files, tmp, dtype, tokenizer.eos_id)
    else:
      num_tokens, max_id = _write_hf(files, tmp, dtype, tokenizer)
  except BaseException:
    if os.path.exists(tmp):  # a bad file stops the build half-way; leave no partial cache behind
      os.remove(tmp)
    raise
  if num_tokens == 0:
    os.remove(tmp)
    raise DataError(f'data.path {path!r} tokenizes to 0 tokens. Use a file with text in it.')
  os.replace(tmp, npy)
  meta = {'format': _FORMAT, 'source': os.path.abspath(path), 'tokenizer': tokenizer.identity,
          'files': [str(f) for f in files], 'num_tokens': num_tokens, 'max_id': max_id,
          'dtype': np.dtype(dtype).name}
  tmp_meta = f'{meta_path}.{os.getpid()}.tmp'
  with open(tmp_meta, 'w') as f:
    json.dump(meta, f)
  os.replace(tmp_meta, meta_path)
  _log_read(path, files, num_tokens, f'tokenized into {npy}')
  return TokenCache(npy, path, num_tokens, max_id, built=True)


_logged: set = set()


def _log_read(path: str, files: list, num_tokens: int, how: str) -> None:
  # Train and eval open the same source; one line per input is enough.
  key = (os.path.abspath(path), num_tokens)
  if key in _logged:
    return
  _logged.add(key)
  names = ', '.join(str(f) for f in files[:5]) + (f' ... ({len(files)} files)' if len(files) > 5 else '')
  log.info('Text data %s: %d file(s) (%s), %d tokens, %s.', path, len(files), names, num_tokens, how)


class _TextCheck:
  """Checks one file's bytes, fed in chunks: UTF-8, no NUL. Raises DataError naming the offset."""

  def __init__(self, file):
    self.file = file
    self.offset = 0  # bytes fed so far
    self.decoder = codecs.getincrementaldecoder('utf-8')()

  def feed(self, chunk: bytes, final: bool = False) -> None:
    nul = chunk.find(b'\0')
    if nul >= 0:
      self._fail(f'has a NUL byte at byte offset {self.offset + nul}: it is binary, not text')
    pending = len(self.decoder.getstate()[0])  # an incomplete character carried over from the last chunk
    try:
      self.decoder.decode(chunk, final)
    except UnicodeDecodeError as e:
      self._fail(f'is not valid UTF-8 at byte offset {self.offset - pending + e.start} ({e.reason})')
    self.offset += len(chunk)

  def finish(self) -> None:
    self.feed(b'', final=True)

  def _fail(self, what: str):
    raise DataError(f'{str(self.file)!r} (under data.path) {what}. data.kind=text '
                    'reads UTF-8 text files only: re-encode it as UTF-8, remove it from the folder, or '
                    "tokenize it yourself and use data.kind='tokens'.")


def _write_bytes(files, out: str, dtype, eos_id: int) -> tuple[int, int]:
  total = sum(f.stat().st_size + 1 for f in files)
  arr = np.lib.format.open_memmap(out, mode='w+', dtype=dtype, shape=(total,))
  pos = 0
  for f in files:
    check = _TextCheck(f)
    with open(f, 'rb') as fh:
      while chunk := fh.read(_CHUNK_BYTES):
        check.feed(chunk)
        arr[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)
    check.finish()
    arr[pos] = eos_id
    pos += 1
  arr.flush()
  del arr
  return total, eos_id


def _write_hf(files, out: str, dtype, tokenizer: HFTokenizer) -> tuple[int, int]:
  pieces = []
  for f in files:
    raw = f.read_bytes()
    check = _TextCheck(f)
    check.feed(raw, final=True)
    lines = raw.decode('utf-8').splitlines(keepends=True)
    # Batches of lines keep memory bounded and let the Rust tokenizer use its threads.
    for i in range(0, len(lines), _HF_LINES_PER_BATCH):
      pieces.extend(tokenizer.encode_batch(lines[i:i + _HF_LINES_PER_BATCH]))
  ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
  arr = np.lib.format.open_memmap(out, mode='w+', dtype=dtype, shape=ids.shape)
  arr[:] = ids
  arr.flush()
  del arr
  return int(ids.size), int(ids.max()) if ids.size else -1
