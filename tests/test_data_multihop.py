"""The multi-hop task: determinism, answers checked by an independent resolver, hop coverage."""
import numpy as np
import pytest

from ztt_jax import data
from ztt_jax.data.multihop import MultiHopSource
from ztt_jax.errors import ConfigError

CFG = data.DataConfig(kind='multihop', seq_len=64, max_hops=4, num_distractors=2, seed=3, eval_examples=40)


def _decode(example):
  """Rebuilds the example's text and answer from the model's view: inputs, targets, weights."""
  inputs, targets, weights = example['inputs'], example['targets'], example['weights']
  assert inputs[0] == data.BOS_ID
  assert weights.sum() == 1.0, 'loss must be on the single answer token only'
  pos = int(np.argmax(weights))
  prompt = bytes(int(t) for t in inputs[1:pos + 1]).decode('ascii')
  answer = chr(int(targets[pos]))
  assert targets[pos + 1] == data.EOS_ID
  assert (inputs[pos + 3:] == data.PAD_ID).all() and (targets[pos + 2:] == data.PAD_ID).all()
  return prompt, answer


def _resolve(prompt):
  """Independent resolver: dict lookups until a digit; returns (value, lookups)."""
  body, query = prompt.split('?')
  assert query.endswith('=')
  var = query[:-1]
  table = {}
  for stmt in body.split(';'):
    if stmt:
      lhs, rhs = stmt.split('=')
      assert lhs not in table, f'{lhs} assigned twice in {prompt}'
      table[lhs] = rhs
  lookups = 0
  while not var.isdigit():
    var = table[var]
    lookups += 1
  return var, lookups


def test_same_seed_and_index_give_same_bytes_and_other_indices_differ():
  a, b = MultiHopSource(CFG), MultiHopSource(CFG)
  for i in range(5):
    for key in ('inputs', 'targets', 'weights', 'hops'):
      np.testing.assert_array_equal(a.train_example(i)[key], b.train_example(i)[key])
  prompts = {_decode(a.train_example(i))[0] for i in range(50)}
  assert len(prompts) == 50
  other_seed = MultiHopSource(data.DataConfig(seed=4))
  assert _decode(other_seed.train_example(0))[0] != _decode(a.train_example(0))[0]


def test_answers_and_hop_counts_match_an_independent_resolver():
  src = MultiHopSource(CFG)
  hops_seen = []
  for i in range(300):
    ex = src.train_example(i)
    prompt, answer = _decode(ex)
    value, lookups = _resolve(prompt)
    assert answer == value, prompt
    assert lookups == int(ex['hops']), prompt
    hops_seen.append(lookups)
  counts = np.bincount(hops_seen, minlength=5)[1:]
  assert (counts > 40).all(), f'hops must be uniform over 1..max_hops, got counts {counts}'
  assert len(counts) == CFG.max_hops


def test_eval_set_is_held_out_balanced_and_correct():
  src = MultiHopSource(CFG)
  train = {_decode(src.train_example(i))[0] for i in range(200)}
  hops = []
  for i in range(src.num_eval):
    ex = src.eval_example(i)
    prompt, answer = _decode(ex)
    assert prompt not in train
    assert _resolve(prompt) == (answer, int(ex['hops']))
    hops.append(int(ex['hops']))
  assert np.bincount(hops).tolist() == [0, 10, 10, 10, 10]


def test_seq_len_too_short_names_the_minimum():
  need = data.multihop_min_seq_len(4, 2)
  with pytest.raises(ConfigError, match=f'minimum seq_len is {need}'):
    data.DataConfig(seq_len=need - 1).validate()
  data.DataConfig(seq_len=need).validate()
  # The minimum really is enough: the longest possible examples fit, EOS included.
  src = MultiHopSource(data.DataConfig(seq_len=need, num_distractors=2, max_hops=4))
  for i in range(200):
    _decode(src.train_example(i))
  # Without distractors a max_hops example is the longest one: it must end exactly at seq_len.
  tight = MultiHopSource(data.DataConfig(seq_len=data.multihop_min_seq_len(3, 0), max_hops=3, num_distractors=0))
  longest = tight.eval_example(2)
  assert int(longest['hops']) == 3 and longest['targets'][-1] == data.EOS_ID


def test_batches_carry_hops_and_answer_only_weights():
  it = data.make_train_iterator(CFG, global_batch_size=8, vocab_size=data.BYTE_VOCAB_SIZE)
  batch = next(it)
  assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape == (8, 64)
  assert batch['targets'].dtype == np.int32 and batch['weights'].dtype == np.float32
  assert batch['hops'].dtype == np.int32 and batch['hops'].shape == (8,)
  assert (batch['weights'].sum(axis=1) == 1).all()
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert data.required_vocab_size(CFG) == data.BYTE_VOCAB_SIZE <= 264
