"""ztt_jax's real train step on synthetic batches, shared by benchmarks/vs_torch.py,
benchmarks/gpu_bench.py and benchmarks/profile_step.py.

The step is built and jitted by the project's own code (`run.build` + `run.jit_train_step`, fed by
`partitioning.to_global`), as the trainer does.
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout, no install needed
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ztt_jax.config import base_config, parse  # noqa: E402
from ztt_jax.partitioning import to_global  # noqa: E402
from ztt_jax.run import build, jit_train_step  # noqa: E402


def make_config(*, seq_len: int, batch: int, steps: int, model: dict, lr: float = 1e-3, warmup: int = 10,
                seed: int = 0):
  """A validated Config for a synthetic-batch benchmark (no eval, no checkpoints, no TensorBoard)."""
  cfg = base_config()
  cfg.model.update(model)
  cfg.model.max_seq_len = model.get("max_seq_len", seq_len)  # the learned position table: seq_len rows
  cfg.model.cycle_loss_weight = model.get("cycle_loss_weight", 0.0)
  # The benchmarks feed their own batches; the data section only has to validate (it is never opened).
  cfg.data.kind = "tokens"
  cfg.data.path = "<batches fed by the benchmark>"
  cfg.data.seq_len = seq_len
  cfg.train.global_batch_size = batch
  cfg.train.steps = steps
  cfg.train.learning_rate = lr
  cfg.train.warmup_steps = warmup
  cfg.train.seed = seed
  cfg.eval.max_batches = 0
  cfg.log.tensorboard = False
  return parse(cfg)


class ZttStep:
  """ztt_jax's jitted, sharded train step on one device, fed numpy batches like the trainer feeds them.

  `step(batch)` dispatches one step and returns at once (JAX dispatch is asynchronous, as in the
  trainer's loop); `sync()` waits for it and returns the last loss as a float."""

  def __init__(self, cfg, device=None):
    self.cfg = cfg
    device = device or jax.devices()[0]
    self.run = build(cfg, [device])
    t0 = time.perf_counter()
    with self._ctx():
      self.state = self.run.init(jax.random.key(cfg.train.seed))
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t0  # compiling and running the sharded init
    self.fn = jit_train_step(self.run)
    self.compiled = None
    self.metrics = None

  def _ctx(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.run.mesh))
    stack.enter_context(nn.logical_axis_rules(self.run.axis_rules))
    return stack

  def params_numpy(self):
    return jax.device_get(self.state.params)

  def compile(self, batch) -> float:
    """Lowers and compiles the step for this batch's shapes; returns the seconds it took."""
    t0 = time.perf_counter()
    with self._ctx():
      self.compiled = self.fn.lower(self.state, to_global(batch, self.run.mesh)).compile()
    return time.perf_counter() - t0

  def cost_analysis(self) -> dict:
    ca = self.compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {k: float(v) for k, v in (ca or {}).items() if k in ("flops", "bytes accessed", "transcendentals")}

  def memory_analysis(self) -> dict:
    m = self.compiled.memory_analysis()
    return {k: int(getattr(m, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                             "output_size_in_bytes", "alias_size_in_bytes") if hasattr(m, k)}

  def step(self, batch) -> None:
    # After compile() the compiled executable runs directly: no re-trace, so a program built under
    # a temporary patch (benchmarks/profile_step.py) keeps running as it was compiled.
    fn = self.compiled or self.fn
    with self._ctx():
      self.state, self.metrics = fn(self.state, to_global(batch, self.run.mesh))

  def sync(self) -> float:
    return float(jax.device_get(self.metrics["loss"]))


def token_batches(n: int, batch: int, seq_len: int, vocab: int, *, data_path=None, seed: int = 0) -> list:
  """n batches {'inputs','targets','weights'} of random windows of a byte file (Tiny Shakespeare, say),
  or of uniform random tokens when no file is given. The same list feeds every framework."""
  rng = np.random.default_rng(seed)
  if data_path:
    corpus = np.frombuffer(pathlib.Path(data_path).read_bytes(), np.uint8).astype(np.int32)
    if corpus.size < seq_len + 2:
      raise ValueError(f"--data={data_path}: {corpus.size} bytes is shorter than one window of {seq_len + 1}")
  out = []
  for _ in range(n):
    if data_path:
      starts = rng.integers(0, corpus.size - seq_len - 1, batch)
      toks = np.stack([corpus[s:s + seq_len + 1] for s in starts])
    else:
      toks = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((batch, seq_len), np.float32)})
  return out


def alternating_windows(steps: dict, batches: list, tokens: int, rounds: int, window_s: float) -> dict:
  """tokens/s of each ZttStep per timed window (about window_s each, at least 3 steps), after a
  warm-up; the windows alternate between the steps, in order then in reverse, so drift in the
  machine's speed hits every step alike. `tokens`: tokens per step."""
  for st in steps.values():
    for b in batches[:3]:
      st.step(b)
    st.sync()
  per = {}
  for k, st in steps.items():
    t0 = time.perf_counter()
    st.step(batches[0])
    st.sync()
    per[k] = time.perf_counter() - t0
  n = {k: max(3, int(window_s / p)) for k, p in per.items()}
  windows = {k: [] for k in steps}
  names = list(steps)
  for r in range(rounds):
    for k in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      for i in range(n[k]):
        steps[k].step(batches[i % len(batches)])
      steps[k].sync()
      windows[k].append(n[k] * tokens / (time.perf_counter() - t0))
  return windows
