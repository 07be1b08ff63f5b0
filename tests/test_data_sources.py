"""Text cache, token files, ArrayRecord: formats, splits and windowing."""
import os

import numpy as np
import pytest

from ztt_jax import data
from ztt_jax.data import pipeline, text
from ztt_jax.data.tokenizer import ByteTokenizer


def _all_batches(it, n):
  return [next(it) for _ in range(n)]


def test_text_folder_is_tokenized_once_into_the_cache_dir(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.txt').write_text('hello world\n' * 20)
  (corpus / 'b.txt').write_text('héllo again\n' * 20)
  (corpus / '.hidden').write_text('never read')
  cache_dir = tmp_path / 'cache'
  cfg = data.DataConfig(kind='text', path=str(corpus), seq_len=8, cache_dir=str(cache_dir))

  first = text.build_token_cache(str(corpus), ByteTokenizer(), str(cache_dir))
  mtime = os.stat(first.path).st_mtime_ns
  assert first.built and os.path.dirname(first.path) == str(cache_dir)
  second = text.build_token_cache(str(corpus), ByteTokenizer(), str(cache_dir))
  assert not second.built and second.path == first.path and os.stat(first.path).st_mtime_ns == mtime
  data.make_train_iterator(cfg, global_batch_size=2, vocab_size=264)
  assert os.stat(first.path).st_mtime_ns == mtime
  assert sorted(os.listdir(corpus)) == ['.hidden', 'a.txt', 'b.txt']  # Nothing written next to the input.

  tokens = np.asarray(first.tokens())
  a_bytes = (corpus / 'a.txt').read_bytes()
  b_bytes = (corpus / 'b.txt').read_bytes()
  expected = list(a_bytes) + [data.EOS_ID] + list(b_bytes) + [data.EOS_ID]
  assert tokens.dtype == np.uint16 and tokens.tolist() == expected

  # Editing a file invalidates the cache.
  (corpus / 'b.txt').write_text('changed\n' * 30)
  assert text.build_token_cache(str(corpus), ByteTokenizer(), str(cache_dir)).built


def test_text_cache_defaults_under_xdg_cache_home(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  src = tmp_path / 'in.txt'
  src.write_text('abcdefghij' * 10)
  cache = text.build_token_cache(str(src), ByteTokenizer())
  assert cache.path.startswith(str(tmp_path / 'xdg' / 'ztt_jax'))


def test_window_splits_eval_contiguous_and_disjoint_from_train(tmp_path):
  # Token value == position, so every batch shows exactly which positions it read.
  n, T = 1000, 16
  path = tmp_path / 'pos.npy'
  np.save(path, np.arange(n, dtype=np.uint32))
  cfg = data.DataConfig(kind='tokens', path=str(path), seq_len=T, eval_fraction=0.1)
  src = pipeline.open_source(cfg)
  assert src.num_train_tokens == 900

  for b in _all_batches(data.make_train_iterator(cfg, global_batch_size=8, vocab_size=n), 20):
    assert b['targets'].max() < 900 and (b['weights'] == 1).all()
    np.testing.assert_array_equal(b['targets'], b['inputs'] + 1)  # Windows are contiguous slices.

  evals = data.make_eval_batches(cfg, global_batch_size=4, vocab_size=n)
  targets = np.concatenate([b['targets'].reshape(-1) for b in evals])
  weights = np.concatenate([b['weights'].reshape(-1) for b in evals])
  scored = targets[weights > 0]
  # The held-out targets tile the tail exactly once, in order: contiguous and non-overlapping.
  np.testing.assert_array_equal(scored, np.arange(901, n))
  assert evals[0]['inputs'][0, 0] == 900


def test_hf_tokenizer_json_is_used_for_text(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  words = ['the', 'cat', 'sat', 'on', 'mat', '[UNK]']
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok_path = tmp_path / 'tok.json'
  tok.save(str(tok_path))
  corpus = tmp_path / 'c.txt'
  corpus.write_text('the cat sat on the mat\n' * 40)
  cfg = data.DataConfig(kind='text', path=str(corpus), seq_len=6, tokenizer=str(tok_path),
                        cache_dir=str(tmp_path / 'cache'), eval_fraction=0.0)

  assert data.required_vocab_size(cfg) == 6
  b = next(data.make_train_iterator(cfg, global_batch_size=4, vocab_size=6))
  # WordLevel ids follow the cycle the(0) cat(1) sat(2) on(3) the(0) mat(4).
  cycle = [0, 1, 2, 3, 0, 4]
  for row in b['inputs']:
    start = [i for i in range(6) if (np.roll(cycle, -i)[:6] == row).all()]
    assert start, row
  assert len(data.make_eval_batches(cfg, global_batch_size=4, vocab_size=6)) == 0
  # The byte cache of the same corpus is a different entry, not a stale hit.
  byte_cache = text.build_token_cache(str(corpus), ByteTokenizer(), str(tmp_path / 'cache'))
  assert byte_cache.built and byte_cache.max_id == data.EOS_ID


@pytest.mark.parametrize('dtype', ['uint16', 'uint32'])
@pytest.mark.parametrize('ext', ['.bin', '.npy'])
def test_token_files_bin_and_npy(tmp_path, dtype, ext):
  big = 70000 if dtype == 'uint32' else 60000
  tokens = (np.arange(400) * 7919 % big).astype(dtype)
  path = tmp_path / f'toks{ext}'
  if ext == '.npy':
    np.save(path, tokens)
  else:
    tokens.tofile(path)
  cfg = data.DataConfig(kind='tokens', path=str(path), seq_len=10, token_dtype=dtype)
  assert data.required_vocab_size(cfg) == int(tokens.max()) + 1
  b = next(data.make_train_iterator(cfg, global_batch_size=4, vocab_size=big))
  as_text = tokens.astype(np.int64).tolist()
  for inp, tgt in zip(b['inputs'], b['targets']):
    s = as_text.index(int(inp[0]))
    assert inp.tolist() == as_text[s:s + 10] and tgt.tolist() == as_text[s + 1:s + 11]


def test_array_record_round_trip_and_epoch_permutation(tmp_path):
  rng = np.random.default_rng(0)
  # Record r holds the value r repeated, so batches reveal which record each row came from.
  seqs = [np.full(int(rng.integers(3, 30)), r, np.uint32) for r in range(20)]
  path = tmp_path / 'data.array_record'
  assert data.write_array_record(str(path), seqs) == 20
  cfg = data.DataConfig(kind='array_record', path=str(path), seq_len=12, eval_fraction=0.1, seed=5)
  assert data.required_vocab_size(cfg) == 20

  it = data.make_train_iterator(cfg, global_batch_size=6, vocab_size=20)
  rows = np.concatenate([next(it)['inputs'] for _ in range(6)])  # 36 rows = two epochs of 18.
  records = rows[:, 0]
  epoch0, epoch1 = records[:18], records[18:36]
  assert sorted(epoch0) == list(range(18)) == sorted(epoch1)  # Each epoch is a permutation of train records.
  assert list(epoch0) != list(epoch1)
  batch = next(it)
  for inp, tgt, w in zip(batch['inputs'], batch['targets'], batch['weights']):
    r = int(inp[0])
    real = min(len(seqs[r]), 13) - 1  # Long records are cropped to seq_len+1, short ones padded.
    assert w.tolist() == [1.0] * real + [0.0] * (12 - real)
    assert (tgt[:real] == r).all()

  evals = list(data.make_eval_batches(cfg, global_batch_size=4, vocab_size=20))
  scored = np.concatenate([b['targets'][b['weights'] > 0] for b in evals])
  expected = np.concatenate([s[1:] for s in seqs[18:]])
  np.testing.assert_array_equal(np.sort(scored), np.sort(expected))


def test_realistic_corpus_tinyshakespeare(tmp_path):
  path = '/work/shared/data/tinyshakespeare.txt'
  cfg = data.DataConfig(kind='text', path=path, seq_len=128, cache_dir=str(tmp_path / 'cache'))
  b = next(data.make_train_iterator(cfg, global_batch_size=4, vocab_size=264))
  assert b['inputs'].shape == (4, 128) and b['inputs'].max() < 256
  corpus = open(path, 'rb').read()
  for row in b['inputs']:
    assert bytes(row.astype(np.uint8)) in corpus
  evals = data.make_eval_batches(cfg, global_batch_size=64, vocab_size=264, max_batches=2)
  assert len(evals) == 2 and evals[1]['weights'].all()
