"""The embedded multi-hop task: pointer chasing through shuffled variable assignments.

One example, as bytes (BOS/EOS/PAD are the special ids of `tokenizer.py`):

    <BOS>q=v;f=3;v=f;x=8;c=q;?c=3<EOS><PAD>...

Statements are `x=D;` (a literal digit) or `x=y;` (a copy), every variable is assigned once, and the
order is shuffled. The queried variable sits at the end of a chain of `hops` statements
(`f=3; v=f; q=v; c=q` is 4 hops), so answering needs `hops` lookups. Distractor chains start at a
fresh literal or branch off any earlier variable, so copies of the answer can exist off the path.
The loss is on the answer digit only. Everything is a pure function of (seed, stream, index).
"""
import string

import numpy as np

from ztt_jax.data.config import DataConfig
from ztt_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

TRAIN_STREAM = 0
EVAL_STREAM = 1


def make_tokens(seed: int, stream: int, index: int, max_hops: int, num_distractors: int,
                hops: int | None = None) -> tuple[np.ndarray, int, int]:
  """Returns (tokens, answer_position, hops) for one example; tokens has no padding."""
  rng = np.random.default_rng([seed, stream, index])
  if hops is None:
    hops = int(rng.integers(1, max_hops + 1))
  chain_lens = [hops] + [int(n) for n in rng.integers(1, max_hops + 1, size=num_distractors)]
  names = iter(rng.permutation(list(string.ascii_lowercase))[:sum(chain_lens)])
  digits = string.digits

  statements = []
  defined = []
  query = ''
  for c, length in enumerate(chain_lens):
    # The queried chain always starts at a literal; distractors may fork off existing variables.
    if c == 0 or not defined or rng.random() < 0.5:
      source = digits[rng.integers(10)]
    else:
      source = defined[rng.integers(len(defined))]
    for _ in range(length):
      name = str(next(names))
      statements.append(f'{name}={source};')
      defined.append(name)
      source = name
    if c == 0:
      query = source
      answer = _resolve_chain(statements, query)

  order = rng.permutation(len(statements))
  text = ''.join(statements[i] for i in order) + f'?{query}='
  body = np.frombuffer(text.encode('ascii'), np.uint8).astype(np.int32)
  tokens = np.concatenate([[BOS_ID], body, [ord(answer), EOS_ID]]).astype(np.int32)
  return tokens, 1 + len(body), hops


def _resolve_chain(statements: list[str], var: str) -> str:
  table = dict(s[:-1].split('=') for s in statements)
  while var not in string.digits:
    var = table[var]
  return var


class MultiHopSource:
  """Random-access multi-hop examples; train and eval use disjoint seed streams."""

  has_hops = True
  pad_id = PAD_ID
  max_token_id = EOS_ID

  def __init__(self, cfg: DataConfig):
    self.cfg = cfg
    self.seq_len = cfg.seq_len
    self.num_eval = cfg.eval_examples
    self.name = "the multi-hop task (data.kind='multihop')"

  def train_example(self, index: int) -> dict:
    return self._example(TRAIN_STREAM, index, hops=None)

  def eval_example(self, index: int) -> dict:
    # Eval cycles through hop counts so every count gets the same number of examples.
    return self._example(EVAL_STREAM, index, hops=1 + index % self.cfg.max_hops)

  def pad_example(self) -> dict:
    T = self.seq_len
    return {'inputs': np.full(T, PAD_ID, np.int32), 'targets': np.full(T, PAD_ID, np.int32),
            'weights': np.zeros(T, np.float32), 'hops': np.int32(0)}

  def _example(self, stream: int, index: int, hops: int | None) -> dict:
    cfg = self.cfg
    tokens, answer_pos, hops = make_tokens(cfg.seed, stream, index, cfg.max_hops, cfg.num_distractors, hops)
    T = self.seq_len
    padded = np.full(T + 1, PAD_ID, np.int32)
    padded[:len(tokens)] = tokens  # DataConfig.validate guarantees it fits.
    weights = np.zeros(T, np.float32)
    weights[answer_pos - 1] = 1.0  # Target position t predicts token t+1.
    return {'inputs': padded[:-1], 'targets': padded[1:], 'weights': weights, 'hops': np.int32(hops)}
