"""Autoregressive decoding with a KV cache and per-token early exit that really skips work.

Cache layout (`init_cache`), RoPE'd keys and values in the compute dtype, M = cache length:
  head   {'k','v'}: [L_head, B, M, H, K]     one entry per unique head layer
  middle {'k','v'}: [C, S, B, M, H, K]       one entry per (cycle, cycled layer)
  tail   {'k','v'}: [L_tail, B, M, H, K]

`forward_cached` runs T new tokens at positions offset..offset+T-1 against the cache: T = prompt
length for the prefill, T = 1 per decoding step. The cycles run in a `lax.while_loop` that stops as
soon as every new token has exited, so a token that exits after cycle c runs no attention or MLP in
cycles c+1..C. Its cache entries for those cycles are then the K/V projections of its frozen state
with each layer's params (the middle params are shared by all cycles, so one projection per layer
fills every skipped cycle). That is `ZTTModel.apply(..., frozen_kv='state')`, which the tests check
logit for logit (the default, model.frozen_kv='state'). `frozen_kv='stack'` reproduces the other freeze semantics instead (a
frozen token still runs each later cycle's stack so its deeper layers' K/V can be recomputed), and
then nothing can be skipped.

Exit uses the zero-attention signal with token granularity: a decoding step has no later tokens, and
the confidence signal would need a tail cache per cycle.

`generate` is one jitted program: prefill, then a `lax.while_loop` over steps that feeds each
sampled token back. Compared with a Python loop over a jitted step, it has no per-token dispatch or
host sync (which on an accelerator would dominate a small model's step) and still compiles once per
(batch, prompt length, cache length); the number of new tokens, the sampling parameters and the
threshold are traced, so changing them does not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax.errors import ConfigError
from ztt_jax.model import ZTTModel
from ztt_jax.model.config import FROZEN_KV
from ztt_jax.model.block import Block
from ztt_jax.model.exit import update_exited
from ztt_jax.model.layers import dtype_of

Array = jax.Array


def init_cache(cfg, batch: int, max_len: int) -> dict:
  """Zeroed cache for `batch` rows and `max_len` positions (layout in the module docstring)."""
  dt = dtype_of(cfg.dtype)
  H, K = cfg.num_heads, cfg.head_dim

  def kv(*lead):
    z = jnp.zeros((*lead, batch, max_len, H, K), dt)
    return {"k": z, "v": z}

  cache = {"middle": kv(cfg.cycles, cfg.stack_layers)}
  if cfg.unique_head_layers:
    cache["head"] = kv(cfg.unique_head_layers)
  if cfg.unique_tail_layers:
    cache["tail"] = kv(cfg.unique_tail_layers)
  return cache


def _run_stack(cfg, layers_params, x_BxTxD, zero_keys, zero_bias, mask, kv, positions_T, frozen=None):
  """The stack's layers in order over the new tokens, reading and writing the layers' cache.

  kv: {'k','v'} [L, B, M, H, K]. Returns (x, a0_LxBxT, kv)."""
  block = Block(cfg)

  def layer(x_BxTxD, xs):
    p, zk, zb, k, v = xs
    x_BxTxD, a0_BxT, (k, v) = block.apply({"params": p}, x_BxTxD, (zk, zb), mask, frozen,
                                          positions_T=positions_T, kv_cache=(k, v))
    return x_BxTxD, (a0_BxT, k, v)

  x_BxTxD, (a0_LxBxT, k, v) = jax.lax.scan(layer, x_BxTxD, (layers_params, zero_keys, zero_bias, kv["k"], kv["v"]))
  return x_BxTxD, a0_LxBxT, {"k": k, "v": v}


def _frozen_kv(cfg, layers_params, x_BxTxD, positions_T):
  """K/V of every cycled layer projected from the state x: [S, B, T, H, K] each."""
  block = Block(cfg)

  def layer(_, p):
    return None, block.apply({"params": p}, x_BxTxD, (None, None), None, positions_T=positions_T, kv_only=True)

  _, (k, v) = jax.lax.scan(layer, None, layers_params)
  return k, v


def forward_cached(model: ZTTModel, params, tokens_BxT: Array, cache: dict, offset, exit_threshold=None, *,
                   frozen_kv: Optional[str] = None, min_cycles: Optional[int] = None):
  """Logits of T new tokens at positions offset.. given the cache of positions < offset.

  Returns (logits_BxTxV float32, cache, aux) with aux cycles_used [B,T] int32 and zero_attention
  [C,B,T] (0 for cycles a token did not run), as ZTTModel.apply with exit_granularity='token'.
  exit_threshold: None (no exit) or tau (may be traced). Jit-able; `offset` may be traced.
  """
  cfg = model.cfg
  frozen_kv = frozen_kv or cfg.frozen_kv
  if frozen_kv not in FROZEN_KV:
    raise ConfigError(f"frozen_kv={frozen_kv!r}: use one of {', '.join(FROZEN_KV)}")
  if exit_threshold is not None and not cfg.use_zero_token:
    raise ConfigError(f"variant {cfg.variant!r} has no zero token, so decoding cannot exit on zero "
                      "attention; pass exit_threshold=None (--exit_threshold=none)")
  B, T = tokens_BxT.shape
  C, S = cfg.cycles, cfg.stack_layers
  min_c = cfg.min_cycles if min_cycles is None else int(min_cycles)
  offset = jnp.asarray(offset, jnp.int32)
  positions_T = offset + jnp.arange(T, dtype=jnp.int32)
  mask = jnp.asarray(False) if cfg.use_zero_token else None  # as ZTTModel.__call__ passes it
  tau = None if exit_threshold is None else jnp.asarray(exit_threshold, jnp.float32)
  skip = tau is not None and frozen_kv == "state"
  cache = dict(cache)

  x_BxTxD = model.apply({"params": params}, tokens_BxT, offset, method=lambda m, t, o: m.embed.encode(t, o))
  if cfg.unique_head_layers:
    head = params["head"]
    x_BxTxD, _, cache["head"] = _run_stack(cfg, head["layers"], x_BxTxD, head.get("zero_key"),
                                           head.get("zero_bias"), mask, cache["head"], positions_T)

  pool_CxSxHxK, bias_CxSxH = params.get("zero_key_pool"), params.get("zero_bias_pool")
  middle = params["middle"]["layers"]

  def cycle(carry):
    c, x_BxTxD, exited_BxT, used_BxT, za_CxBxT, kv = carry
    row = lambda a: None if a is None else a[c]
    frozen = (exited_BxT, x_BxTxD) if skip else None
    kv_c = jax.tree.map(row, kv)
    new_BxTxD, a0_SxBxT, kv_c = _run_stack(cfg, middle, x_BxTxD, row(pool_CxSxHxK), row(bias_CxSxH), mask,
                                           kv_c, positions_T, frozen)
    kv = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, c, 0), kv, kv_c)
    za_BxT = jnp.mean(a0_SxBxT, axis=0)
    ran_BxT = ~exited_BxT
    x_BxTxD = jnp.where(exited_BxT[..., None], x_BxTxD, new_BxTxD)
    used_BxT = used_BxT + ran_BxT.astype(jnp.int32)
    za_CxBxT = jax.lax.dynamic_update_index_in_dim(za_CxBxT, jnp.where(ran_BxT, za_BxT, 0.0), c, 0)
    if tau is not None:
      exited_BxT = update_exited(exited_BxT, za_BxT, c + 1, tau, min_c, "token")
    return c + 1, x_BxTxD, exited_BxT, used_BxT, za_CxBxT, kv

  def more(carry):
    c, exited_BxT = carry[0], carry[2]
    return (c < C) & ~jnp.all(exited_BxT) if skip else c < C

  carry = (jnp.int32(0), x_BxTxD, jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.int32),
           jnp.zeros((C, B, T), jnp.float32), cache["middle"])
  c_end, x_BxTxD, _, used_BxT, za_CxBxT, kv = jax.lax.while_loop(more, cycle, carry)

  if skip:
    def fill(kv):
      # Every token is frozen here, so cycles c_end.. would have projected K/V from x in each layer.
      k_SxBxTxHxK, v_SxBxTxHxK = _frozen_kv(cfg, middle, x_BxTxD, positions_T)
      later_C = (jnp.arange(C) >= c_end)[:, None, None, None, None, None]
      start = (0, 0, 0, offset, 0, 0)

      def put(a, new):
        cur = jax.lax.dynamic_slice(a, start, (C, S, B, T) + a.shape[-2:])
        return jax.lax.dynamic_update_slice(a, jnp.where(later_C, new[None].astype(a.dtype), cur), start)

      return {"k": put(kv["k"], k_SxBxTxHxK), "v": put(kv["v"], v_SxBxTxHxK)}

    kv = jax.lax.cond(c_end < C, fill, lambda kv: kv, kv)
  cache["middle"] = kv

  if cfg.unique_tail_layers:
    tail = params["tail"]
    x_BxTxD, _, cache["tail"] = _run_stack(cfg, tail["layers"], x_BxTxD, tail.get("zero_key"),
                                           tail.get("zero_bias"), mask, cache["tail"], positions_T)
  logits_BxTxV = model.apply({"params": params}, x_BxTxD, method=lambda m, x: m.embed.decode(m.final_norm(x)))
  return logits_BxTxV, cache, {"cycles_used": used_BxT, "zero_attention": za_CxBxT}


forward_cached_jit = jax.jit(forward_cached, static_argnames=("model", "frozen_kv", "min_cycles"))
"""`forward_cached` compiled; one program per (T, cache shape, exit on/off, frozen_kv)."""


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


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f"temperature={temperature}: must be a finite number >= 0 (0 = greedy)")
  if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
    raise ConfigError(f"top_k={top_k}: must be an integer >= 0 (0 = no top-k filter)")
  if not 0 < top_p <= 1:
    raise ConfigError(f"top_p={top_p}: must be in (0, 1] (1 = no nucleus filter)")


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


@functools.partial(jax.jit, static_argnames=("model", "max_len", "exit_on", "frozen_kv"))
def _generate(model, params, prompt_BxP, rng, max_new, temperature, top_k, top_p, tau, eos_id, *, max_len: int,
              exit_on: bool, frozen_kv: str):
  B, P = prompt_BxP.shape
  N = max_len - P
  tau = tau if exit_on else None
  cache = init_cache(model.cfg, B, max_len)
  logits_BxPxV, cache, aux = forward_cached(model, params, prompt_BxP, cache, 0, tau, frozen_kv=frozen_kv)
  rng, sub = jax.random.split(rng)
  tok_B = sample_logits(sub, logits_BxPxV[:, -1], temperature, top_k, top_p)
  # Rows stop at EOS, and the loop once all have: what is never written reads as EOS.
  out_BxN = jnp.full((B, N), jnp.maximum(eos_id, 0), jnp.int32).at[:, 0].set(tok_B)
  cyc_BxN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(aux["cycles_used"][:, -1])
  done_B = tok_B == eos_id

  def step(carry):
    i, tok_B, cache, rng, out_BxN, cyc_BxN, done_B = carry
    logits_Bx1xV, cache, aux = forward_cached(model, params, tok_B[:, None], cache, P + i, tau,
                                              frozen_kv=frozen_kv)
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


def generate(model: ZTTModel, params: Any, prompt_BxP, *, max_new_tokens: int, rng=None, seed: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, exit_threshold: Optional[float] = None,
             eos_id: Optional[int] = None, frozen_kv: Optional[str] = None, max_len: Optional[int] = None) -> Generation:
  """Samples `max_new_tokens` tokens after each prompt row (all rows the same length P).

  max_len: cache length (default P + max_new_tokens). Keep it fixed to reuse one compile while
  varying max_new_tokens (benchmarks).
  """
  cfg = model.cfg
  prompt_BxP = check_prompt(cfg, prompt_BxP, max_new_tokens)
  check_sampling(temperature, top_k, top_p)
  frozen_kv = frozen_kv or model.cfg.frozen_kv
  if frozen_kv not in FROZEN_KV:
    raise ConfigError(f"frozen_kv={frozen_kv!r}: use one of {', '.join(FROZEN_KV)}")
  P = prompt_BxP.shape[1]
  max_len = P + max_new_tokens if max_len is None else int(max_len)
  if not P + max_new_tokens <= max_len <= cfg.max_seq_len:
    raise ConfigError(f"max_len={max_len}: must be between prompt + max_new_tokens ({P + max_new_tokens}) "
                      f"and model.max_seq_len ({cfg.max_seq_len})")
  if exit_threshold is not None and not cfg.use_zero_token:
    raise ConfigError(f"variant {cfg.variant!r} has no zero token, so it cannot exit on zero attention; "
                      "generate without --exit_threshold")
  rng = jax.random.key(seed) if rng is None else rng
  out, cyc, prompt_cyc, n = _generate(
      model, params, jnp.asarray(prompt_BxP), rng, jnp.int32(max_new_tokens), temperature, int(top_k),
      float(top_p), 0.0 if exit_threshold is None else float(exit_threshold),
      -1 if eos_id is None else int(eos_id), max_len=max_len, exit_on=exit_threshold is not None,
      frozen_kv=frozen_kv)
  n = int(n)
  out, cyc = np.asarray(out)[:, :max_new_tokens], np.asarray(cyc)[:, :max_new_tokens]
  return Generation(tokens=out, step_cycles=cyc, prompt_cycles=np.asarray(prompt_cyc), num_new=n)
