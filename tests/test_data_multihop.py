"""The multi-hop task: determinism, answers and depths checked by an independent resolver, balance,
and the structural rules that close shortcuts (one tree per query, fresh digits repeat)."""
import numpy as np
import pytest

from ztt_jax import data
from ztt_jax.data.multihop import MultiHopSource
from ztt_jax.errors import ConfigError

CFG = data.DataConfig(kind='multihop', seq_len=128, max_hops=6, num_queries=6, num_distractors=4, seed=3,
                      eval_examples=60)


def _decode(example):
  """Rebuilds the example's text and its scored (answer, hops) pairs from the model's view."""
  inputs, targets, weights, hops = example['inputs'], example['targets'], example['weights'], example['difficulty']
  assert inputs[0] == data.BOS_ID
  np.testing.assert_array_equal(hops > 0, weights > 0)  # hops label exactly the scored tokens
  end = int(np.argmax(targets == data.EOS_ID))
  assert (inputs[end + 1:end + 2] == data.EOS_ID).all()  # EOS is an input too unless it ends the row
  assert (inputs[end + 2:] == data.PAD_ID).all() and (targets[end + 1:] == data.PAD_ID).all()
  text = bytes(int(t) for t in inputs[1:end + 1]).decode('ascii')  # everything between BOS and EOS
  scored = [(chr(int(targets[p])), int(hops[p]), p) for p in np.flatnonzero(weights)]
  return text, scored


def _parse(text):
  """Independent parser: statements `xv;` (x takes v) then queries `?xD` (D the answer)."""
  body, *queries = text.split('?')
  table = {}
  for stmt in body.split(';')[:-1]:
    assert len(stmt) == 2 and stmt[0].islower() and (stmt[1].islower() or stmt[1].isdigit()), stmt
    lhs, rhs = stmt
    assert lhs not in table, f'{lhs} assigned twice in {text}'
    table[lhs] = rhs
  assert all(len(q) == 2 for q in queries), queries
  names = [q[0] for q in queries]
  return table, names


def _resolve(table, var):
  """Plain dict lookups until a digit; returns (digit, lookups, path)."""
  path = [var]
  while not var.isdigit():
    var = table[var]
    path.append(var)
  return var, len(path) - 1, path


def test_same_seed_and_index_give_same_bytes_and_other_indices_differ():
  a, b = MultiHopSource(CFG), MultiHopSource(CFG)
  for i in range(5):
    for key in ('inputs', 'targets', 'weights', 'difficulty'):
      np.testing.assert_array_equal(a.train_example(i)[key], b.train_example(i)[key])
      np.testing.assert_array_equal(a.eval_example(i)[key], b.eval_example(i)[key])
  prompts = {_decode(a.train_example(i))[0] for i in range(50)}
  assert len(prompts) == 50
  other_seed = MultiHopSource(data.DataConfig(**{**CFG.__dict__, 'seed': 4}))
  assert _decode(other_seed.train_example(0))[0] != _decode(a.train_example(0))[0]


def test_every_answer_and_hop_label_match_an_independent_resolver():
  src = MultiHopSource(CFG)
  depth_counts = np.zeros(CFG.max_hops + 1, int)
  for i in range(200):
    ex = src.train_example(i)
    text, scored = _decode(ex)
    table, names = _parse(text)
    assert len(names) == len(scored) == CFG.num_queries
    assert len(table) == len(set(table)) <= 26
    for name, (answer, hops, pos) in zip(names, scored):
      # Scored where the answer digit follows `?x` (text index = token index - 1 = target position).
      assert text[pos - 2:pos + 1] == f'?{name}{answer}'
      value, lookups, _ = _resolve(table, name)
      assert answer == value, text
      assert lookups == hops, text
      depth_counts[hops] += 1
  assert depth_counts[0] == 0
  # Every example covers max_hops consecutive depths of the cycle, so training is exactly balanced.
  assert (depth_counts[1:] == 200).all(), depth_counts


def test_queries_use_separate_chains_so_no_query_answers_another():
  src = MultiHopSource(CFG)
  for i in range(100):
    text, scored = _decode(src.train_example(i))
    table, names = _parse(text)
    paths = [_resolve(table, n)[2][:-1] for n in names]
    for q, path in enumerate(paths):
      for other in paths[:q] + paths[q + 1:]:
        assert not set(path) & set(other), text
      # The first statement of each path assigns a literal: one digit per queried chain.
      assert table[path[-1]].isdigit()


def test_distractors_add_literals_and_branches_and_digits_repeat():
  src = MultiHopSource(CFG)
  off_path = branches = literals = repeats = 0
  for i in range(200):
    text, _ = _decode(src.train_example(i))
    table, names = _parse(text)
    path_vars = {v for n in names for v in _resolve(table, n)[2][:-1]}
    for var, rhs in table.items():
      assert _resolve(table, var)[1] <= CFG.max_hops
      if var in path_vars:
        continue
      off_path += 1
      if rhs.isdigit():
        literals += 1
      else:
        branches += 1
    digits = [rhs for rhs in table.values() if rhs.isdigit()]
    repeats += len(digits) > len(set(digits))
  assert off_path == 200 * CFG.num_distractors
  assert literals > 200 and branches > 200
  assert repeats > 100  # a digit seen in the prompt does not name one chain


def test_eval_set_is_held_out_balanced_and_correct():
  src = MultiHopSource(data.DataConfig(**{**CFG.__dict__, 'num_queries': 2}))
  train = {_decode(src.train_example(i))[0] for i in range(200)}
  hops = []
  for i in range(src.num_eval):
    text, scored = _decode(src.eval_example(i))
    assert text not in train
    table, names = _parse(text)
    for name, (answer, h, _) in zip(names, scored):
      assert _resolve(table, name)[:2] == (answer, h)
      hops.append(h)
  # 60 examples x 2 queries, depths stepping through the cycle: 20 queries at each of the 6 depths.
  assert np.bincount(hops).tolist() == [0] + [20] * 6


def test_pad_rows_score_nothing():
  pad = MultiHopSource(CFG).pad_example()
  assert pad['difficulty'].shape == (CFG.seq_len,) and not pad['difficulty'].any() and not pad['weights'].any()


def test_seq_len_too_short_names_the_minimum():
  need = data.multihop_min_seq_len(6, 4, 6)
  assert need == 3 * (21 + 4) + 3 * 6 + 1  # 25 statements and 6 queries of 3 bytes, BOS, EOS - 1
  cfg = dict(max_hops=6, num_queries=6, num_distractors=4)
  with pytest.raises(ConfigError, match=f'minimum seq_len is {need}'):
    data.DataConfig(seq_len=need - 1, **cfg).validate()
  data.DataConfig(seq_len=need, **cfg).validate()
  # The minimum really is enough, and with num_queries == max_hops every example has that length.
  src = MultiHopSource(data.DataConfig(seq_len=need, **cfg))
  for i in range(50):
    ex = src.train_example(i)
    assert ex['targets'][-1] == data.EOS_ID
    _decode(ex)
  with pytest.raises(ConfigError, match='variables'):
    data.DataConfig(seq_len=512, max_hops=6, num_queries=6, num_distractors=6).validate()
  with pytest.raises(ConfigError, match='num_queries'):
    data.DataConfig(num_queries=0).validate()


def test_batches_carry_per_token_hops_and_answer_only_weights():
  it = data.make_train_iterator(CFG, global_batch_size=8, vocab_size=data.BYTE_VOCAB_SIZE)
  batch = next(it)
  assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape == (8, 128)
  assert batch['targets'].dtype == np.int32 and batch['weights'].dtype == np.float32
  assert batch['difficulty'].dtype == np.int32 and batch['difficulty'].shape == (8, 128)
  assert (batch['weights'].sum(axis=1) == CFG.num_queries).all()
  assert ((batch['difficulty'] > 0) == (batch['weights'] > 0)).all()
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert data.required_vocab_size(CFG) == data.BYTE_VOCAB_SIZE <= 264


def test_curriculum_starts_shallow_reaches_every_depth_and_leaves_eval_alone():
  cur = data.DataConfig(**{**CFG.__dict__, 'curriculum_examples': 600})
  src, plain = MultiHopSource(cur), MultiHopSource(CFG)
  deepest = []
  for i in range(0, 800, 20):
    text, scored = _decode(src.train_example(i))
    table, names = _parse(text)
    limit = min(6, 1 + 6 * i // 600)
    assert all(h <= limit for _, h, _ in scored) and max(_resolve(table, v)[1] for v in table) <= limit
    for name, (answer, h, _) in zip(names, scored):
      assert _resolve(table, name)[:2] == (answer, h)
    deepest.append(max(h for _, h, _ in scored))
  assert max(deepest[:5]) == 1 and deepest[-1] == 6  # indices 0..80: one hop only
  # Past the ramp every depth is drawn; the eval stream is the same with or without a curriculum.
  assert {h for i in range(700, 720) for _, h, _ in _decode(src.train_example(i))[1]} == set(range(1, 7))
  for i in range(10):
    np.testing.assert_array_equal(src.eval_example(i)['inputs'], plain.eval_example(i)['inputs'])
  with pytest.raises(ConfigError, match='curriculum_examples'):
    data.DataConfig(curriculum_examples=-1).validate()


TOPO = data.DataConfig(**{**CFG.__dict__, 'order': 'topological'})


def _statements(text):
  """The row's statements `xv` in order (the text before the first query)."""
  return text.split('?')[0].split(';')[:-1]


def test_topological_order_defines_before_use_with_the_same_statements_and_queries():
  topo, shuffled = MultiHopSource(TOPO), MultiHopSource(CFG)
  forward_refs = interleaved = 0
  for get in ('train_example', 'eval_example'):
    for i in range(60):
      t, s = getattr(topo, get)(i), getattr(shuffled, get)(i)
      np.testing.assert_array_equal(t['inputs'], getattr(MultiHopSource(TOPO), get)(i)['inputs'])  # deterministic
      t_text, t_scored = _decode(t)
      s_text, s_scored = _decode(s)
      stmts = _statements(t_text)
      assigned = set()
      for lhs, rhs in stmts:
        assert rhs.isdigit() or rhs in assigned, t_text  # every variable is assigned before it is used
        assigned.add(lhs)
      # Same statements, same queries, answers and depths; only the statements' order differs.
      assert sorted(stmts) == sorted(_statements(s_text))
      assert t_text.split('?')[1:] == s_text.split('?')[1:] and t_scored == s_scored
      s_assigned = set()
      for lhs, rhs in _statements(s_text):
        forward_refs += not (rhs.isdigit() or rhs in s_assigned)
        s_assigned.add(lhs)
      # The trees are interleaved, not emitted one after another: some chain's statements are apart.
      table, names = _parse(t_text)
      where = {lhs: k for k, (lhs, _) in enumerate(stmts)}
      for name in names:
        chain = [where[v] for v in _resolve(table, name)[2][:-1]]
        interleaved += max(chain) - min(chain) + 1 > len(chain)
  assert forward_refs > 100  # shuffled rows do point forward, so the check above is not vacuous
  assert interleaved > 100


def test_topological_keeps_an_order_that_already_is_one():
  from ztt_jax.data.multihop import topological
  for order in (['t4;', 'et;', 'z0;', 'ke;'], ['z0;', 't4;', 'et;', 'ke;']):
    assert topological(order) == order
  assert topological(['ke;', 'et;', 'z0;', 't4;']) == ['z0;', 't4;', 'et;', 'ke;']


def _check_statement_labels(labelled, plain):
  """Statement scores where the row can resolve them; everything else exactly as without labels.
  Returns (scored statements, unscored statements)."""
  np.testing.assert_array_equal(labelled['inputs'], plain['inputs'])
  inputs, targets, weights, diff = (labelled[k] for k in ('inputs', 'targets', 'weights', 'difficulty'))
  query = plain['weights'] > 0
  for k in ('targets', 'weights', 'difficulty'):
    np.testing.assert_array_equal(labelled[k][query], plain[k][query])  # queries unchanged
  text, _ = _decode(plain)
  full_table, _ = _parse(text)
  table, scored, unscored = {}, 0, 0
  statement_positions = set()
  for k, (lhs, rhs) in enumerate(_statements(text)):
    table[lhs] = rhs
    pos = 1 + 3 * k + 1  # the target position whose input is the value byte (BOS, then 3 bytes each)
    assert chr(inputs[pos]) == rhs and plain['targets'][pos] == ord(';')
    statement_positions.add(pos)
    try:
      digit, depth, _ = _resolve(table, lhs)  # only what the row has shown so far
    except KeyError:
      assert weights[pos] == 0 and diff[pos] == 0 and targets[pos] == ord(';')
      unscored += 1
      continue
    assert (digit, depth) == _resolve(full_table, lhs)[:2]
    assert weights[pos] == 1 and chr(targets[pos]) == digit and diff[pos] == depth, text
    scored += 1
  rest = np.ones_like(query)
  rest[list(statement_positions)] = False
  rest &= ~query
  for k in ('targets', 'weights', 'difficulty'):
    np.testing.assert_array_equal(labelled[k][rest], plain[k][rest])
  np.testing.assert_array_equal(diff > 0, weights > 0)
  return scored, unscored


def test_label_statements_scores_each_statement_with_its_digit_and_depth():
  labelled = MultiHopSource(data.DataConfig(**{**TOPO.__dict__, 'label_statements': True}))
  plain, again = MultiHopSource(TOPO), MultiHopSource(data.DataConfig(**{**TOPO.__dict__, 'label_statements': True}))
  depths = set()
  for i in range(100):
    ex = labelled.train_example(i)
    scored, unscored = _check_statement_labels(ex, plain.train_example(i))
    assert unscored == 0 and ex['weights'].sum() == scored + CFG.num_queries  # topological: every statement
    depths |= set(ex['difficulty'][ex['weights'] > 0].tolist())
    for k in ('inputs', 'targets', 'weights', 'difficulty'):
      np.testing.assert_array_equal(ex[k], again.train_example(i)[k])  # deterministic
    # Eval scores the queries alone, so accuracy by depth means the same with or without labels.
    for k in ('inputs', 'targets', 'weights', 'difficulty'):
      np.testing.assert_array_equal(labelled.eval_example(i)[k], plain.eval_example(i)[k])
  assert depths == set(range(1, CFG.max_hops + 1))


def test_label_statements_in_shuffled_order_scores_only_what_the_row_has_resolved():
  labelled = MultiHopSource(data.DataConfig(**{**CFG.__dict__, 'label_statements': True}))
  plain = MultiHopSource(CFG)
  totals = np.zeros(2, int)
  for i in range(100):
    totals += _check_statement_labels(labelled.train_example(i), plain.train_example(i))
  assert (totals > 300).all(), totals


def test_order_and_label_statements_are_validated_in_one_line():
  with pytest.raises(ConfigError, match=r"data.order='random' must be one of \('shuffled', 'topological'\)") as e:
    data.DataConfig(order='random').validate()
  assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match='data.label_statements=1 has type int; expected bool') as e:
    data.DataConfig(label_statements=1).validate()
  assert '\n' not in str(e.value)
  data.DataConfig(order='topological', label_statements=True).validate()
