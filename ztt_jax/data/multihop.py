"""The embedded multi-hop task: pointer chasing through shuffled variable assignments.

One example, as bytes (BOS/EOS/PAD are the special ids of `tokenizer.py`), with max_hops=3,
num_queries=3, num_distractors=3:

    <BOS>et;t4;z0;g6;q7;yt;cz;ke;l4;?c0?l4?k4<EOS>

A statement `xv;` gives variable x the value of v, a literal digit or another variable; every
variable is assigned once, and the statements are shuffled. After them come `num_queries` queries
`?x` each followed by the digit x resolves to; every answer is scored. Each query has its own tree:
a chain from a literal to the queried variable, `h` statements long (above: `t4; et; ke` makes `?k`
need 3 lookups, `?c` 2 and `?l` 1; `g6`, `q7` and `yt` are distractors), so answering needs
exactly `h` lookups, at the natural rate one per attention layer. An example's query depths are
`num_queries` consecutive values of the cycle 1..max_hops, from a random start (train) or from
`index % max_hops` (eval, so the held-out stream is balanced over depths). With
`curriculum_examples` > 0 the training stream starts shallow (see `curriculum_depth`).

Why it is built this way (each rule closes a shortcut a shallow model would otherwise take):
- One query per tree, each tree with its own literal: an answer is independent of the other
  answers, so a query cannot copy an earlier answer, and no earlier query `?yD` lies on another
  query's path (which would let it stand in for a statement and save lookups).
- Distractors are fresh literals (more digits to confuse with the answer, repeats included: the
  digits are drawn with replacement) or copies branching off any variable, queried chains
  included, so shared prefixes and same-depth look-alikes exist off the path.
- Several scored queries per example: more signal per token than one answer per example.
- Three bytes per statement, no `=`: the value sits right after its variable, so one lookup is the
  classic induction pattern (find the earlier x, read the next token), and sequences stay short.

Two options (`data.order`, `data.label_statements`; defaults shuffled / off):
- order='topological': the same statements, queries and answers, but in a random order in which
  every variable is assigned before a statement uses it (`topological`), so a left-to-right reader
  can resolve each statement as it arrives instead of looking forward.
- label_statements (training only): every statement `xv;` is scored too, at the position whose
  input is v, with x's resolved digit as target and x's depth as difficulty (`statement_targets`):
  dense supervision at every depth. In shuffled order only the statements whose chain precedes
  them are scored (no causal model can know the rest). Eval scores the queries alone.

`difficulty` is per token: the depth (hop count) of the query, or statement, answered at that
target position, 0 where nothing is scored. Everything is a pure function of (seed, stream, index).
"""
import string

import numpy as np

from ztt_jax.data.config import DataConfig, multihop_query_depths
from ztt_jax.data.synthetic import EVAL_STREAM, TRAIN_STREAM, SyntheticSource, curriculum_level  # noqa: F401 (streams: tests)
from ztt_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

VARIABLES = string.ascii_lowercase
DIGITS = string.digits
# A distractor is a copy of an existing variable (a branch) with this probability, else a fresh literal.
BRANCH_PROBABILITY = 0.5


def make_example(seed: int, stream: int, index: int, max_hops: int, num_queries: int,
                 num_distractors: int, start: int | None = None, depth_limit: int | None = None,
                 order: str = 'shuffled') -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (tokens, answer_positions, hops) for one example; tokens has no padding.

  answer_positions[q] is the index in `tokens` of query q's answer digit and hops[q] its depth.
  start: first depth of the cycle 1..max_hops (0-based); None draws it (the training stream).
  depth_limit: deepest query and variable (default max_hops); the training curriculum lowers it.
  order: 'shuffled' or 'topological' (see `topological`); the same (seed, stream, index) gives the
  same statements, queries and answers in both, only the statements' order differs.
  """
  rng = np.random.default_rng([seed, stream, index])
  depth_limit = max_hops if depth_limit is None else depth_limit
  if start is None:
    start = int(rng.integers(depth_limit))
  depths = multihop_query_depths(depth_limit, num_queries, start)
  names = iter(rng.permutation(list(VARIABLES)))

  statements = []
  depth_of = {}  # variable -> lookups it needs
  queries = []
  for depth in depths:
    source = DIGITS[rng.integers(10)]
    for d in range(1, depth + 1):
      name = str(next(names))
      statements.append(f'{name}{source};')
      depth_of[name] = d
      source = name
    queries.append(source)
  for _ in range(num_distractors):
    # Branch off anything that stays within max_hops, so no variable is deeper than a query can be.
    parents = [v for v, d in depth_of.items() if d < depth_limit]
    name = str(next(names))
    if parents and rng.random() < BRANCH_PROBABILITY:
      parent = parents[rng.integers(len(parents))]
      statements.append(f'{name}{parent};')
      depth_of[name] = depth_of[parent] + 1
    else:
      statements.append(f'{name}{DIGITS[rng.integers(10)]};')
      depth_of[name] = 1

  table = {s[0]: s[1] for s in statements}
  statements = [statements[i] for i in rng.permutation(len(statements))]
  if order == 'topological':
    statements = topological(statements)
  body = ''.join(statements)
  order = rng.permutation(num_queries)
  positions, hops = [], []
  for q in order:
    body += f'?{queries[q]}'
    positions.append(1 + len(body))  # +1 for BOS: the index of the answer digit in the tokens
    hops.append(depths[q])
    body += _lookup(table, queries[q])[0]
  tokens = np.concatenate([[BOS_ID], np.frombuffer(body.encode('ascii'), np.uint8), [EOS_ID]]).astype(np.int32)
  return tokens, np.asarray(positions, np.int64), np.asarray(hops, np.int32)


def _lookup(table: dict, var: str) -> tuple[str | None, int]:
  """(digit, lookups) that `var` resolves to through `table`; digit None if the chain leaves it."""
  lookups = 0
  while var not in DIGITS:
    if var not in table:
      return None, lookups
    var, lookups = table[var], lookups + 1
  return var, lookups


def topological(statements: list[str]) -> list[str]:
  """`statements` reordered so every variable is assigned before a statement uses it.

  At each step the earliest remaining statement (in the given random order) whose value is a digit
  or an assigned variable comes next: still a random order, trees interleaved, and the identity on
  a list that already is topological.
  """
  pending, assigned, out = list(statements), set(), []
  while pending:
    ready = next(s for s in pending if s[1] in DIGITS or s[1] in assigned)
    pending.remove(ready)
    assigned.add(ready[0])
    out.append(ready)
  return out


def statement_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(positions, digits, depths) that score the statements of one example (`make_example`'s tokens).

  Statement `xv;` is scored at the target position whose INPUT is its value byte v (its plain
  next-token target would be `;`): the target becomes the digit x resolves to (a token id) and the
  label x's depth, the lookups a query `?x` needs (one more than the lookups left from v; a literal
  `x7;` is depth 1, its target 7). A statement is scored only if its whole chain is assigned before
  it: every statement in topological order; in shuffled order the others stay unscored, since no
  causal model can know their answer there.
  """
  table, positions, digits, depths = {}, [], [], []
  t = 1  # after BOS, statements are 3 tokens each until the first query's '?'
  while tokens[t] != ord('?'):
    var, value = chr(tokens[t]), chr(tokens[t + 1])
    table[var] = value
    digit, lookups = _lookup(table, var)
    if digit is not None:
      positions.append(t + 1)
      digits.append(ord(digit))
      depths.append(lookups)
    t += 3
  return np.asarray(positions, np.int64), np.asarray(digits, np.int32), np.asarray(depths, np.int32)


def curriculum_depth(cfg: DataConfig, index: int) -> int:
  """Deepest query of training example `index` (see `synthetic.curriculum_level`)."""
  return curriculum_level(index, cfg.max_hops, cfg.curriculum_examples)


class MultiHopSource(SyntheticSource):
  """Random-access multi-hop examples; train and eval use disjoint seed streams."""

  max_token_id = EOS_ID
  name = "the multi-hop task (data.kind='multihop')"

  def _train_args(self, index: int) -> dict:
    return dict(start=None, depth_limit=curriculum_depth(self.cfg, index),
                label_statements=self.cfg.label_statements)

  def _eval_args(self, index: int) -> dict:
    # Eval steps through the start of the depth cycle so every depth gets the same number of queries,
    # and scores the queries alone, so accuracy by depth means the same with or without
    # data.label_statements.
    return dict(start=index % self.cfg.max_hops)

  def _example(self, stream: int, index: int, start: int | None, depth_limit: int | None = None,
               label_statements: bool = False) -> dict:
    cfg = self.cfg
    tokens, answer_pos, hops = make_example(cfg.seed, stream, index, cfg.max_hops, cfg.num_queries,
                                            cfg.num_distractors, start, depth_limit, cfg.order)
    T = self.seq_len
    padded = np.full(T + 1, PAD_ID, np.int32)
    padded[:len(tokens)] = tokens  # DataConfig.validate guarantees it fits.
    # Target position t predicts token t + 1, so the answer at token p is scored at position p - 1.
    positions, labels = answer_pos - 1, hops
    targets = padded[1:].copy()  # a copy: statement targets must not overwrite the inputs
    if label_statements:
      at, digits, depths = statement_targets(tokens)
      targets[at] = digits
      positions, labels = np.concatenate([positions, at]), np.concatenate([labels, depths])
    weights = np.zeros(T, np.float32)
    weights[positions] = 1.0
    hops_T = np.zeros(T, np.int32)
    hops_T[positions] = labels
    return {'inputs': padded[:-1], 'targets': targets, 'weights': weights, 'difficulty': hops_T}
