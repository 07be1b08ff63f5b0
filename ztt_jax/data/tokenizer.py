"""Tokenizers: raw bytes (the default) or a Hugging Face `tokenizers` JSON file."""
import hashlib
from typing import Sequence, Union

import numpy as np

from ztt_jax import storage
from ztt_jax.errors import DataError

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
BYTE_VOCAB_SIZE = 259
"""Smallest model vocab that covers byte data: 256 bytes plus PAD, BOS, EOS."""


class ByteTokenizer:
  """Ids 0..255 are the UTF-8 bytes; PAD/BOS/EOS follow."""

  vocab_size = BYTE_VOCAB_SIZE
  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  # Bumped if the mapping ever changes, so stale text caches are not reused.
  identity = 'bytes-v1'

  def encode(self, text: Union[str, bytes]) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8)).decode('utf-8', errors='replace')


class HFTokenizer:
  """A `tokenizers.Tokenizer` loaded from JSON. It has no BOS/EOS of ours; padding uses id 0,
  which is harmless because padded positions carry weight 0 and come after the real tokens."""

  pad_id = 0
  bos_id = None
  eos_id = None

  def __init__(self, path: str):
    import tokenizers  # Only needed for this option.

    if not storage.isfile(path):  # a local file or gs://...
      raise DataError(
          f'Tokenizer file {path!r} (data.tokenizer) does not exist. Set --config.data.tokenizer to a '
          "Hugging Face tokenizers JSON file, or to 'bytes'.")
    data = storage.read_bytes(path)
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
    except Exception as e:  # The library raises bare Exceptions on malformed JSON.
      raise DataError(
          f'Tokenizer file {path!r} (data.tokenizer) is not a valid Hugging Face tokenizers JSON file '
          f'({e}). Save one with tokenizers.Tokenizer.save(path), or use data.tokenizer=bytes.') from e
    self.path = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.identity = 'hf-' + hashlib.sha256(data).hexdigest()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int64)

  def encode_batch(self, texts: Sequence[str]) -> list:
    out = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int64) for e in out]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Union[ByteTokenizer, HFTokenizer]:
  """`spec` is 'bytes' or the path of a tokenizers JSON file (data.tokenizer)."""
  return ByteTokenizer() if spec == 'bytes' else HFTokenizer(spec)
