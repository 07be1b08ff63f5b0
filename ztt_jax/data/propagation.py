"""The embedded default task: carry the latest marker's digit through a sliding attention window.

One row, as bytes (BOS is the special id of `tokenizer.py`), window 4, max_difficulty 3:

    <BOS>qzk7hwqpbfx2mmdrjvcq5ub...
    targets: ....7777777777222222222225...

Filler letters with a digit (a "marker") every few positions. The target at EVERY position after
the first marker is the digit of the most recent marker at or before it. With a sliding window of
`w` keys (the query's own included) one attention layer moves a fact at most w - 1 positions, so a
position k places after its marker needs ceil(k / (w - 1)) layers before the digit can reach it.
That count is the position's difficulty (1 at the marker and just after it):

    difficulty(k) = max(1, ceil(k / (w - 1)))

So depth is needed by construction: an L-layer model cannot answer difficulty L + 1 (token shift
adds one position, no more), while a looped model's reach grows with its cycles, at test time too.
The per-layer step is the same at every depth ("take the newest digit in view"), which is what a
shared middle stack can learn once and reuse.

Gaps between markers are drawn so that every gap reaches the top difficulty but none passes it:
uniform in [(D - 1)(w - 1) + 2, D(w - 1) + 1] for D = the difficulty limit. Every difficulty
below D then gets w - 1 (or w) positions per gap, and D about half that: dense, near-balanced
supervision at every depth. With `curriculum_examples` > 0 the training stream starts with short
gaps (difficulty 1) and opens longer ones linearly. Everything is a pure function of
(seed, stream, index).

Per token, `difficulty` is 0 where nothing is scored (before the first marker, and padding).
"""
import string

import numpy as np

from ztt_jax.data.config import DataConfig
from ztt_jax.data.synthetic import SyntheticSource, curriculum_level
from ztt_jax.data.tokenizer import BOS_ID, PAD_ID

FILLER = np.frombuffer(string.ascii_lowercase.encode('ascii'), np.uint8).astype(np.int32)
DIGITS = np.frombuffer(string.digits.encode('ascii'), np.uint8).astype(np.int32)


def gap_range(window: int, max_difficulty: int) -> tuple[int, int]:
  """(shortest, longest) distance between consecutive markers for difficulties 1..max_difficulty."""
  step = window - 1
  return (max_difficulty - 1) * step + 2, max_difficulty * step + 1


def difficulty(distance: np.ndarray, window: int) -> np.ndarray:
  """Layers a fact needs to travel `distance` positions through a window of `window` keys (>= 1)."""
  return np.maximum(1, -(-np.asarray(distance) // (window - 1))).astype(np.int32)


def make_row(seed: int, stream: int, index: int, seq_len: int, window: int,
             max_difficulty: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [T], targets [T], difficulty [T]) for one row; difficulty 0 where unscored."""
  rng = np.random.default_rng([seed, stream, index])
  lo, hi = gap_range(window, max_difficulty)
  inputs = FILLER[rng.integers(len(FILLER), size=seq_len)]
  inputs[0] = BOS_ID
  # The first marker comes early, at a random phase, so every row scores most of its positions.
  marker = int(rng.integers(1, 1 + min(window, seq_len - 1)))
  targets = np.full(seq_len, PAD_ID, np.int32)
  difficulty_T = np.zeros(seq_len, np.int32)
  while marker < seq_len:
    end = min(seq_len, marker + int(rng.integers(lo, hi + 1)))
    digit = DIGITS[rng.integers(len(DIGITS))]
    inputs[marker] = digit
    targets[marker:end] = digit
    difficulty_T[marker:end] = difficulty(np.arange(end - marker), window)
    marker = end
  return inputs.astype(np.int32), targets, difficulty_T


def curriculum_difficulty(cfg: DataConfig, index: int) -> int:
  """Difficulty limit of training example `index` (see `synthetic.curriculum_level`)."""
  return curriculum_level(index, cfg.max_difficulty, cfg.curriculum_examples)


class PropagationSource(SyntheticSource):
  """Random-access rows of the propagation task; train and eval use disjoint seed streams."""

  max_token_id = BOS_ID
  name = "the propagation task (data.kind='propagation')"

  def _train_args(self, index: int) -> dict:
    return dict(max_difficulty=curriculum_difficulty(self.cfg, index))

  def _eval_args(self, index: int) -> dict:
    return dict(max_difficulty=self.cfg.max_difficulty)

  def _example(self, stream: int, index: int, max_difficulty: int) -> dict:
    cfg = self.cfg
    inputs, targets, difficulty_T = make_row(cfg.seed, stream, index, cfg.seq_len, cfg.window, max_difficulty)
    return {'inputs': inputs, 'targets': targets, 'weights': (difficulty_T > 0).astype(np.float32),
            'difficulty': difficulty_T}
