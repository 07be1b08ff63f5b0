"""Grain pipelines: process sharding, exact resume (in memory and through Orbax), eval padding."""
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ztt_jax import data

MULTIHOP = data.DataConfig(kind='multihop', seq_len=56, seed=1, eval_examples=10)
V = data.BYTE_VOCAB_SIZE


def _tokens_cfg(tmp_path):
  path = tmp_path / 'tokens.npy'
  np.save(path, (np.arange(5000) % 1000).astype(np.uint16))
  return data.DataConfig(kind='tokens', path=str(path), seq_len=16, seed=2)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('kind', ['multihop', 'tokens'])
def test_process_rows_concatenate_to_the_single_process_batch(kind, tmp_path):
  cfg = MULTIHOP if kind == 'multihop' else _tokens_cfg(tmp_path)
  vocab = V if kind == 'multihop' else 1000
  single = data.make_train_iterator(cfg, global_batch_size=8, vocab_size=vocab)
  expected = [next(single) for _ in range(3)]
  for P in (1, 2, 4):
    its = [data.make_train_iterator(cfg, global_batch_size=8, vocab_size=vocab, process_index=p, process_count=P)
           for p in range(P)]
    for step in range(3):
      local = [next(it) for it in its]
      assert all(b['inputs'].shape[0] == 8 // P for b in local)
      _assert_equal(_concat(local), expected[step])
  # Consecutive batches and rows are different examples.
  assert not np.array_equal(expected[0]['inputs'], expected[1]['inputs'])
  assert len({row.tobytes() for row in expected[0]['inputs']}) == 8


def test_iterator_state_resumes_exactly_and_is_process_count_independent():
  it = data.make_train_iterator(MULTIHOP, global_batch_size=4, vocab_size=V)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]

  fresh = data.make_train_iterator(MULTIHOP, global_batch_size=4, vocab_size=V)
  fresh.set_state(state)
  for e in expected:
    _assert_equal(next(fresh), e)

  # The state saved by 1 process restores on 2 processes, and their rows tile the same batches.
  halves = [data.make_train_iterator(MULTIHOP, global_batch_size=4, vocab_size=V, process_index=p, process_count=2)
            for p in range(2)]
  for h in halves:
    for _ in range(3):
      next(h)
    assert h.get_state() == state
  restored = [data.make_train_iterator(MULTIHOP, global_batch_size=4, vocab_size=V, process_index=p,
                                       process_count=2) for p in range(2)]
  for r in restored:
    r.set_state(state)
  for e in expected:
    _assert_equal(_concat([next(r) for r in restored]), e)


def test_iterator_round_trips_through_orbax(tmp_path):
  it = data.make_train_iterator(MULTIHOP, global_batch_size=4, vocab_size=V)
  next(it)
  next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]

  # A different process count restores the same position: batches are the same global ones.
  restored = [data.make_train_iterator(MULTIHOP, global_batch_size=4, vocab_size=V, process_index=p,
                                       process_count=2) for p in range(2)]
  for r in restored:
    with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
      assert mngr.latest_step() == 2
      mngr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(r)))
  for e in expected:
    _assert_equal(_concat([next(r) for r in restored]), e)


def test_eval_batches_pad_the_last_batch_and_shard_by_process():
  full = data.make_eval_batches(MULTIHOP, global_batch_size=4, vocab_size=V)
  assert len(full) == 3  # 10 examples -> 4 + 4 + 2 real rows.
  weights = [b['weights'].sum(axis=1) for b in full]
  np.testing.assert_array_equal(np.concatenate(weights), [1] * 10 + [0] * 2)
  assert not full[2]['difficulty'][2:].any()  # pad rows label no token with a difficulty
  _assert_equal(list(full)[1], list(full)[1])  # Re-iterable and deterministic.
  halves = [data.make_eval_batches(MULTIHOP, global_batch_size=4, vocab_size=V, process_index=p, process_count=2)
            for p in range(2)]
  for i in range(3):
    _assert_equal(_concat([halves[0][i], halves[1][i]]), full[i])
  assert len(data.make_eval_batches(MULTIHOP, global_batch_size=4, vocab_size=V, max_batches=2)) == 2
