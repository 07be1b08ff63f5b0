"""What the embedded tasks share: random-access rows from (seed, stream, index), no files.

A task subclass says how to build one row (`_example(stream, index, **args)`) and with which
arguments training index i (`_train_args`, the curriculum) and eval index i (`_eval_args`) are built;
train and eval draw from disjoint seed streams.
"""
import numpy as np

from ztt_jax.data.config import DataConfig
from ztt_jax.data.tokenizer import PAD_ID

TRAIN_STREAM = 0
EVAL_STREAM = 1


def curriculum_level(index: int, limit: int, curriculum_examples: int) -> int:
  """Hardest level training example `index` may draw: grows linearly from 1 to `limit` over the
  first `curriculum_examples` examples (`limit` throughout when 0). Easy examples first let the
  one-step skill form before harder ones, whose targets a model without it can only guess, drown
  its signal."""
  if curriculum_examples <= 0:
    return limit
  return min(limit, 1 + limit * index // curriculum_examples)


class SyntheticSource:
  """A `pipeline.Source` over generated rows with a per-token difficulty label (`difficulty`)."""

  has_difficulty = True
  pad_id = PAD_ID
  name = 'an embedded task'

  def __init__(self, cfg: DataConfig):
    self.cfg = cfg
    self.seq_len = cfg.seq_len
    self.num_eval = cfg.eval_examples

  def train_example(self, index: int) -> dict:
    return self._example(TRAIN_STREAM, index, **self._train_args(index))

  def eval_example(self, index: int) -> dict:
    return self._example(EVAL_STREAM, index, **self._eval_args(index))

  def pad_example(self) -> dict:
    T = self.seq_len
    return {'inputs': np.full(T, PAD_ID, np.int32), 'targets': np.full(T, PAD_ID, np.int32),
            'weights': np.zeros(T, np.float32), 'difficulty': np.zeros(T, np.int32)}
