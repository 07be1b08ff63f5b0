"""Every bad input fails early with a DataError/ConfigError that names the path (or field) and the fix."""
import ml_collections
import numpy as np
import pytest

from ztt_jax import data
from ztt_jax.errors import ConfigError, DataError


def _train(cfg, *, vocab_size=264, global_batch_size=4, process_count=1):
  return data.make_train_iterator(cfg, global_batch_size=global_batch_size, vocab_size=vocab_size,
                                  process_count=process_count)


def _text(path, tmp_path, **kw):
  return data.DataConfig(kind='text', path=str(path), cache_dir=str(tmp_path / 'cache'), **kw)


@pytest.mark.parametrize('kind', ['text', 'tokens', 'array_record'])
def test_missing_path(tmp_path, kind):
  path = tmp_path / 'nope.npy'
  with pytest.raises(DataError, match='does not exist') as e:
    _train(data.DataConfig(kind=kind, path=str(path), cache_dir=str(tmp_path / 'c')))
  assert str(path) in str(e.value) and '--config.data.path' in str(e.value)


@pytest.mark.parametrize('kind,name', [('text', 'a.txt'), ('tokens', 'a.bin'), ('tokens', 'a.npy'),
                                       ('array_record', 'a.array_record')])
def test_empty_file(tmp_path, kind, name):
  path = tmp_path / name
  path.write_bytes(b'')
  with pytest.raises(DataError, match='empty') as e:
    _train(data.DataConfig(kind=kind, path=str(path), cache_dir=str(tmp_path / 'c')))
  assert str(path) in str(e.value)


def test_empty_folder(tmp_path):
  folder = tmp_path / 'empty'
  folder.mkdir()
  (folder / 'blank.txt').write_text('')
  with pytest.raises(DataError, match='no non-empty files') as e:
    _train(_text(folder, tmp_path))
  assert str(folder) in str(e.value)


def test_corpus_shorter_than_seq_len_plus_one(tmp_path):
  path = tmp_path / 'short.txt'
  path.write_text('abc')  # 3 bytes + EOS = 4 tokens.
  with pytest.raises(DataError) as e:
    _train(_text(path, tmp_path, seq_len=8))
  msg = str(e.value)
  assert str(path) in msg and '4 tokens' in msg and 'seq_len + 1 = 9' in msg and 'Lower data.seq_len' in msg

  tokens = tmp_path / 'short.npy'
  np.save(tokens, np.arange(5, dtype=np.uint16))
  with pytest.raises(DataError, match=r'5 tokens, shorter than data.seq_len \+ 1 = 9') as e:
    _train(data.DataConfig(kind='tokens', path=str(tokens), seq_len=8))
  assert str(tokens) in str(e.value)


def test_corpus_too_short_for_a_train_and_eval_split(tmp_path):
  path = tmp_path / 'tokens.npy'
  np.save(path, np.arange(12, dtype=np.uint16))
  cfg = data.DataConfig(kind='tokens', path=str(path), seq_len=8, eval_fraction=0.1)
  with pytest.raises(DataError, match='eval_fraction=0') as e:
    _train(cfg)
  assert str(path) in str(e.value)
  _train(data.DataConfig(kind='tokens', path=str(path), seq_len=8, eval_fraction=0.0))


@pytest.mark.parametrize('kind', ['tokens', 'array_record'])
def test_token_id_at_or_above_vocab_size(tmp_path, kind):
  ids = np.arange(100, dtype=np.uint32)
  ids[37] = 999
  if kind == 'tokens':
    path = tmp_path / 't.npy'
    np.save(path, ids)
  else:
    path = tmp_path / 't.array_record'
    data.write_array_record(str(path), [ids[:50], ids[50:]])
  cfg = data.DataConfig(kind=kind, path=str(path), seq_len=8, eval_fraction=0.0)
  with pytest.raises(DataError) as e:
    _train(cfg, vocab_size=500)
  msg = str(e.value)
  assert str(path) in msg and '999' in msg and '500' in msg and 'model.vocab_size' in msg
  with pytest.raises(DataError, match='999'):
    data.make_eval_batches(cfg, global_batch_size=4, vocab_size=500)
  with pytest.raises(DataError, match='at least 1000'):
    _train(cfg, vocab_size=999)  # An id equal to vocab_size is already out of range.
  _train(cfg, vocab_size=1000)


def test_byte_data_needs_the_byte_vocab(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('hello there, ' * 10)
  with pytest.raises(DataError, match=f'at least {data.BYTE_VOCAB_SIZE}') as e:
    _train(_text(path, tmp_path, seq_len=8), vocab_size=256)
  assert str(path) in str(e.value)
  with pytest.raises(DataError, match='multi-hop'):
    _train(data.DataConfig(), vocab_size=200)


@pytest.mark.parametrize('case', ['float_npy', '2d_npy', 'odd_bin', 'txt_ext', 'not_npy'])
def test_bad_token_file_dtype_shape_or_extension(tmp_path, case):
  if case == 'float_npy':
    path = tmp_path / 'f.npy'
    np.save(path, np.zeros(100, np.float32))
    expect = 'dtype float32'
  elif case == '2d_npy':
    path = tmp_path / 'f.npy'
    np.save(path, np.zeros((10, 10), np.uint16))
    expect = 'must be 1-D'
  elif case == 'odd_bin':
    path = tmp_path / 'f.bin'
    path.write_bytes(b'\x00' * 101)
    expect = 'data.token_dtype'
  elif case == 'txt_ext':
    path = tmp_path / 'f.txt'
    path.write_text('hello')
    expect = "data.kind='text'"
  else:
    path = tmp_path / 'f.npy'
    path.write_bytes(b'definitely not numpy')
    expect = 'np.save'
  with pytest.raises(DataError, match=expect) as e:
    _train(data.DataConfig(kind='tokens', path=str(path), seq_len=8))
  assert str(path) in str(e.value)


def test_bad_array_record_files(tmp_path):
  junk = tmp_path / 'junk.array_record'
  junk.write_bytes(b'\x01' * 100)
  with pytest.raises(DataError, match='write_array_record') as e:
    _train(data.DataConfig(kind='array_record', path=str(junk), seq_len=8))
  assert str(junk) in str(e.value)

  from array_record.python import array_record_module as arm
  odd = tmp_path / 'odd.array_record'
  w = arm.ArrayRecordWriter(str(odd), 'group_size:1')
  w.write(b'abc')
  w.close()
  with pytest.raises(DataError, match='record 0 has 3 bytes') as e:
    _train(data.DataConfig(kind='array_record', path=str(odd), seq_len=8, eval_fraction=0.0))
  assert str(odd) in str(e.value)

  folder = tmp_path / 'folder'
  folder.mkdir()
  with pytest.raises(DataError, match='without') as e:
    _train(data.DataConfig(kind='array_record', path=str(folder), seq_len=8))
  assert str(folder) in str(e.value)


def test_bad_hf_tokenizer_and_non_utf8_text(tmp_path):
  corpus = tmp_path / 'c.txt'
  corpus.write_text('some words here ' * 20)
  missing = tmp_path / 'missing.json'
  with pytest.raises(DataError, match='does not exist') as e:
    _train(_text(corpus, tmp_path, seq_len=8, tokenizer=str(missing)))
  assert str(missing) in str(e.value)
  broken = tmp_path / 'broken.json'
  broken.write_text('{"not": "a tokenizer"}')
  with pytest.raises(DataError, match='not a valid') as e:
    _train(_text(corpus, tmp_path, seq_len=8, tokenizer=str(broken)))
  assert str(broken) in str(e.value)

  from tokenizers import Tokenizer, models
  good = tmp_path / 'good.json'
  Tokenizer(models.WordLevel({'[UNK]': 0}, unk_token='[UNK]')).save(str(good))
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes('caf\xe9 '.encode('latin-1') * 20)
  with pytest.raises(DataError, match='not valid UTF-8') as e:
    _train(_text(latin1, tmp_path, seq_len=8, tokenizer=str(good)))
  assert str(latin1) in str(e.value)


def test_global_batch_not_divisible_by_process_count():
  with pytest.raises(DataError, match='not divisible by the process count 4') as e:
    _train(data.DataConfig(), global_batch_size=10, process_count=4)
  assert 'multiple of 4' in str(e.value)
  with pytest.raises(DataError, match='not divisible'):
    data.make_eval_batches(data.DataConfig(), global_batch_size=6, vocab_size=264, process_count=4)


def test_config_errors_name_the_field_and_fix():
  with pytest.raises(ConfigError, match='Unknown field data.seqlen. Valid fields: kind, path, seq_len'):
    data.DataConfig.from_any({'seqlen': 10})
  cd = ml_collections.ConfigDict({'kind': 'text', 'path': '/x.txt', 'seq_len': 32, 'eval_fraction': 0})
  cfg = data.DataConfig.from_any(cd)
  assert cfg.seq_len == 32 and cfg.eval_fraction == 0.0 and data.DataConfig.from_any(cfg) is cfg
  with pytest.raises(ConfigError, match="data.kind='bogus'"):
    data.DataConfig.from_any({'kind': 'bogus'})
  with pytest.raises(ConfigError, match='needs data.path'):
    data.DataConfig.from_any({'kind': 'text'})
  with pytest.raises(ConfigError, match="data.kind='multihop' uses the embedded task"):
    data.DataConfig.from_any({'path': '/some/file.txt'})
  with pytest.raises(ConfigError, match='data.seq_len=.*expected int'):
    data.DataConfig.from_any({'seq_len': '64'})
  with pytest.raises(ConfigError, match='only 26'):
    # Query chains at the deepest start (7 + 8 + 9 statements) plus 3 distractors: 27 variables.
    data.DataConfig(max_hops=9, num_queries=3, num_distractors=3, seq_len=500).validate()
  with pytest.raises(ConfigError, match='data.eval_fraction'):
    data.DataConfig(kind='tokens', path='x.bin', eval_fraction=1.0).validate()
  with pytest.raises(ConfigError, match='data.token_dtype'):
    data.DataConfig(kind='tokens', path='x.bin', token_dtype='int8').validate()
