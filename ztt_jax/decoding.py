"""Autoregressive decoding with a KV cache and per-token early exit that really skips work.

This module allocates the cache, samples, and runs the generate loop; the model maths (the cached
forward and its early exit) is `ZTTModel.extend`, which runs the same cycle step as training.

Cache layout (`init_cache`), RoPE'd keys and values in the compute dtype, M = cache length, or with
model.attention_window = w a rolling buffer of M = min(w, max_len) entries (position p in slot p % M,
see attention.ring_keys), so decoding memory is O(w) whatever the length:
  head   {'k','v'}: [L_head, B, M, H, K]     one entry per unique head layer
  middle {'k','v'}: [C, S, B, M, H, K]       one entry per (cycle, cycled layer); C = the cycles to
                                             run, which may exceed the zero-key pool
  tail   {'k','v'}: [L_tail, B, M, H, K]
  prev_token: [B] int32, the last token seen (-1 before any)   model.token_shift only

`forward_cached` runs T new tokens at positions offset..offset+T-1 against the cache: T = prompt
length for the prefill, T = 1 per decoding step. A token that exits after cycle c runs no attention
or MLP in cycles c+1..C; its cache entries for those cycles are the K/V projections of its frozen
state, which is what `ZTTModel.apply(..., rule)` computes with frozen_kv='state' (the tests check it
logit for logit). frozen_kv='stack' reproduces the other freeze semantics instead (a frozen token
still runs each later cycle's stack so its deeper layers' K/V can be recomputed), and then nothing
can be skipped.

Exit uses any signal but confidence (ExitRule.signal: the zero_attention ones, state_delta, or the
learned gate's), with token granularity: a decoding step has no later tokens, and the confidence
signal would need a tail cache per cycle. The delta signals' previous values live in the cycle state. Input injection (model.input_injection) runs inside the same cycle step.

`generate` is one jitted program: prefill, then a `lax.while_loop` over steps that feeds each
sampled token back. Compared with a Python loop over a jitted step, it has no per-token dispatch or
host sync (which on an accelerator would dominate a small model's step) and still compiles once per
(batch, prompt length, cache length, exit rule's static fields); the number of new tokens, the
sampling parameters and the threshold are traced, so changing them does not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax.errors import ConfigError
from ztt_jax.model import ZTTModel
from ztt_jax.model.exit import ExitRule
from ztt_jax.model.layers import dtype_of

Array = jax.Array


def init_cache(cfg, batch: int, max_len: int, num_cycles: Optional[int] = None) -> dict:
  """Zeroed cache for `batch` rows, `max_len` positions and `num_cycles` cycles (default
  cfg.cycles; layout in the module docstring)."""
  dt = dtype_of(cfg.dtype)
  H, K = cfg.kv_heads, cfg.head_dim  # grouped-query attention caches only the kv heads

  M = max_len if cfg.attention_window is None else min(max_len, cfg.attention_window)

  def kv(*lead):
    z = jnp.zeros((*lead, batch, M, H, K), dt)
    return {"k": z, "v": z}

  cache = {"middle": kv(cfg.cycles if num_cycles is None else int(num_cycles), cfg.stack_layers)}
  if cfg.unique_head_layers:
    cache["head"] = kv(cfg.unique_head_layers)
  if cfg.unique_tail_layers:
    cache["tail"] = kv(cfg.unique_tail_layers)
  if cfg.token_shift:
    cache["prev_token"] = jnp.full((batch,), -1, jnp.int32)  # the token before the next one; -1: none
  return cache


def forward_cached(model: ZTTModel, params, tokens_BxT: Array, cache: dict, offset,
                   rule: Optional[ExitRule] = None):
  """Logits of T new tokens at positions offset.. given the cache of positions < offset.

  Returns (logits_BxTxV float32, cache, aux); see ZTTModel.extend. rule: None (no exit) or an
  ExitRule (its threshold may be traced). Jit-able; `offset` may be traced.
  """
  return model.apply({"params": params}, tokens_BxT, cache, offset, rule, method=ZTTModel.extend)


forward_cached_jit = jax.jit(forward_cached, static_argnames=("model",))
"""`forward_cached` compiled; one program per (T, cache shape, exit rule's static fields)."""


# ------------------------------------------------------------------------------------------ sampling

def sample_logits(rng, logits_BxV: Array, temperature, top_k, top_p) -> Array:
  """One token id per row. temperature 0: argmax. top_k 0 and top_p 1 switch those filters off;
  top_k keeps the k largest logits, top_p then keeps the smallest set whose probability reaches p.
  All three may be traced."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  V = logits_BxV.shape[-1]
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)
  l_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  desc_BxV = -jnp.sort(-l_BxV, axis=-1)
  top_k = jnp.asarray(top_k, jnp.int32)
  kth_Bx1 = jax.lax.dynamic_index_in_dim(desc_BxV, jnp.clip(top_k - 1, 0, V - 1), axis=1, keepdims=True)
  l_BxV = jnp.where((top_k > 0) & (l_BxV < kth_Bx1), -jnp.inf, l_BxV)
  desc_BxV = jnp.where((top_k > 0) & (desc_BxV < kth_Bx1), -jnp.inf, desc_BxV)
  p_BxV = jax.nn.softmax(desc_BxV, axis=-1)
  before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass of the strictly larger tokens
  keep_BxV = before_BxV < jnp.asarray(top_p, jnp.float32)  # the largest token is always kept
  cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, desc_BxV, jnp.inf), axis=-1, keepdims=True)
  l_BxV = jnp.where(l_BxV < cutoff_Bx1, -jnp.inf, l_BxV)
  sampled_B = jax.random.categorical(rng, l_BxV, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled_B, greedy_B)


@flax.struct.dataclass
class Sampling:
  """How `generate` picks each token. Every field is traced, so changing them does not recompile.

  temperature 0: argmax. top_k 0 and top_p 1 switch those filters off (see sample_logits).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def checked(self) -> "Sampling":
    """Validated, with Python types that keep jit's cache key the same for every value."""
    t, k, p = self.temperature, self.top_k, self.top_p
    if not (np.isfinite(t) and t >= 0):
      raise ConfigError(f"temperature={t}: must be a finite number >= 0 (0 = greedy)")
    if isinstance(k, bool) or int(k) != k or k < 0:
      raise ConfigError(f"top_k={k}: must be an integer >= 0 (0 = no top-k filter)")
    if not 0 < p <= 1:
      raise ConfigError(f"top_p={p}: must be in (0, 1] (1 = no nucleus filter)")
    return Sampling(float(t), int(k), float(p), int(self.seed))


# ------------------------------------------------------------------------------------------ generate

@dataclasses.dataclass
class Generation:
  tokens: np.ndarray
  """[B, max_new_tokens] int32; after a row's EOS (if eos_id is set) the row repeats eos_id."""
  step_cycles: np.ndarray
  """[B, max_new_tokens] int32: middle-stack cycles run by the forward pass that produced each token
  (for token 0 that is the prompt's last position in the prefill); 0 once the row had finished."""
  prompt_cycles: np.ndarray
  """[B, P] int32: cycles used by each prompt position in the prefill."""
  num_new: int
  """Tokens generated (the loop stops early when every row has emitted eos_id)."""


@functools.partial(jax.jit, static_argnames=("model", "max_len", "num_cycles"))
def _generate(model, params, prompt_BxP, max_new, sampling: Sampling, rule: Optional[ExitRule], eos_id, *,
              max_len: int, num_cycles: Optional[int]):
  B, P = prompt_BxP.shape
  N = max_len - P
  temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
  rng = jax.random.key(sampling.seed)
  cache = init_cache(model.cfg, B, max_len, num_cycles)
  logits_BxPxV, cache, aux = forward_cached(model, params, prompt_BxP, cache, 0, rule)
  rng, sub = jax.random.split(rng)
  tok_B = sample_logits(sub, logits_BxPxV[:, -1], temperature, top_k, top_p)
  # Rows stop at EOS, and the loop once all have: what is never written reads as EOS.
  out_BxN = jnp.full((B, N), jnp.maximum(eos_id, 0), jnp.int32).at[:, 0].set(tok_B)
  cyc_BxN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(aux["cycles_used"][:, -1])
  done_B = tok_B == eos_id

  def step(carry):
    i, tok_B, cache, rng, out_BxN, cyc_BxN, done_B = carry
    logits_Bx1xV, cache, aux = forward_cached(model, params, tok_B[:, None], cache, P + i, rule)
    rng, sub = jax.random.split(rng)
    nxt_B = jnp.where(done_B, eos_id, sample_logits(sub, logits_Bx1xV[:, 0], temperature, top_k, top_p))
    out_BxN = jax.lax.dynamic_update_index_in_dim(out_BxN, nxt_B, i + 1, 1)
    cyc_BxN = jax.lax.dynamic_update_index_in_dim(cyc_BxN, jnp.where(done_B, 0, aux["cycles_used"][:, 0]), i + 1, 1)
    return i + 1, nxt_B, cache, rng, out_BxN, cyc_BxN, done_B | (nxt_B == eos_id)

  def more(carry):
    i, done_B = carry[0], carry[-1]
    return (i + 1 < max_new) & ~jnp.all(done_B)

  i, _, _, _, out_BxN, cyc_BxN, _ = jax.lax.while_loop(
      more, step, (jnp.int32(0), tok_B, cache, rng, out_BxN, cyc_BxN, done_B))
  return out_BxN, cyc_BxN, aux["cycles_used"], i + 1


def check_prompt(cfg, prompt_BxP, max_new_tokens: int) -> np.ndarray:
  prompt_BxP = np.asarray(prompt_BxP)
  if prompt_BxP.ndim == 1:
    prompt_BxP = prompt_BxP[None]
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] == 0:
    raise ConfigError(f"prompt has shape {prompt_BxP.shape}: give at least one token id per row ([B, P])")
  if not np.issubdtype(prompt_BxP.dtype, np.integer):
    raise ConfigError(f"prompt ids must be integers, got dtype {prompt_BxP.dtype}")
  bad = prompt_BxP[(prompt_BxP < 0) | (prompt_BxP >= cfg.vocab_size)]
  if bad.size:
    raise ConfigError(f"prompt token id(s) {sorted(set(bad.tolist()))[:5]} are outside the model vocabulary "
                      f"0..{cfg.vocab_size - 1}; encode the prompt with the run's tokenizer")
  if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: must be an integer >= 1")
  P = prompt_BxP.shape[1]
  if P + max_new_tokens > cfg.max_seq_len:
    room = cfg.max_seq_len - P
    fix = (f"lower --max_new_tokens to <= {room}" if room > 0 else
           f"shorten the prompt to < {cfg.max_seq_len} tokens")
    raise ConfigError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                      f"max_seq_len={cfg.max_seq_len}; {fix}")
  return prompt_BxP.astype(np.int32)


def generate(model: ZTTModel, params: Any, prompt_BxP, *, max_new_tokens: int, sampling: Sampling = Sampling(),
             rule: Optional[ExitRule] = None, eos_id: Optional[int] = None, max_len: Optional[int] = None,
             num_cycles: Optional[int] = None) -> Generation:
  """Samples `max_new_tokens` tokens after each prompt row (all rows the same length P).

  rule: the exit rule (None: no exit; the configured one is ExitRule.from_config(model.cfg)).
  max_len: cache length (default P + max_new_tokens). Keep it fixed to reuse one compile while
    varying max_new_tokens (benchmarks).
  num_cycles: cycles per forward pass (default model.cfg.cycles; may exceed the zero-key pool).
  """
  cfg = model.cfg
  prompt_BxP = check_prompt(cfg, prompt_BxP, max_new_tokens)
  sampling = sampling.checked()
  P = prompt_BxP.shape[1]
  max_len = P + max_new_tokens if max_len is None else int(max_len)
  if not P + max_new_tokens <= max_len <= cfg.max_seq_len:
    raise ConfigError(f"max_len={max_len}: must be between prompt + max_new_tokens ({P + max_new_tokens}) "
                      f"and model.max_seq_len ({cfg.max_seq_len})")
  out, cyc, prompt_cyc, n = _generate(
      model, params, jnp.asarray(prompt_BxP), jnp.int32(max_new_tokens), sampling, rule,
      -1 if eos_id is None else int(eos_id), max_len=max_len, num_cycles=num_cycles)
  n = int(n)
  out, cyc = np.asarray(out)[:, :max_new_tokens], np.asarray(cyc)[:, :max_new_tokens]
  return Generation(tokens=out, step_cycles=cyc, prompt_cycles=np.asarray(prompt_cyc), num_new=n)
