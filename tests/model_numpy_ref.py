"""An independent float64 numpy implementation of the ZTT forward pass, written as plain loops.

It reads the documented param tree (ztt_jax/model/lm.py) and shares no code with the model.
"""
import math

import flax.linen as nn
import numpy as np


def to_np(params):
  import jax
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))


def layer(stack, j):
  """Params of layer j of a stacked ('layers' leading axis) subtree."""
  if isinstance(stack, dict):
    return {k: layer(v, j) for k, v in stack.items()}
  return stack[j]


def norm(p, x, cfg):
  if cfg.norm == "layernorm":
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]


def rope(x, theta):
  """x [T, H, K]."""
  T, _, K = x.shape
  half = K // 2
  out = np.empty_like(x)
  for t in range(T):
    for i in range(half):
      ang = t * theta ** (-i / half)
      c, s = math.cos(ang), math.sin(ang)
      out[t, :, i] = x[t, :, i] * c - x[t, :, i + half] * s
      out[t, :, i + half] = x[t, :, i + half] * c + x[t, :, i] * s
  return out


def attention(q, k, v, zero_key=None, zero_bias=None, mask_zero=False, window=None):
  """One sequence. q [T,H,K]; k,v [T,G,K] (G kv heads dividing H: query head h reads kv head
  h // (H / G)); zero_key [H,K]. Softmax over [zero slot, keys 0..t] (keys t-window+1..t with a
  window) with a zero-value column. Returns out [T,H,K], a0 [H,T]."""
  T, H, K = q.shape
  group = H // k.shape[1]
  out = np.zeros((T, H, K))
  a0 = np.zeros((H, T))
  for h in range(H):
    g = h // group
    for t in range(T):
      keys = range(0 if window is None else max(0, t - window + 1), t + 1)
      logits = [q[t, h] @ k[s, g] / math.sqrt(K) for s in keys]
      values = [v[s, g] for s in keys]
      if zero_key is not None:
        z = q[t, h] @ zero_key[h] / math.sqrt(K) + (0.0 if zero_bias is None else zero_bias[h])
        logits = [-np.inf if mask_zero else z] + logits
        values = [np.zeros(K)] + values
      logits = np.array(logits)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      out[t, h] = sum(pi * vi for pi, vi in zip(p, values))
      if zero_key is not None:
        a0[h, t] = p[0]
  return out, a0


def block(p, x, cfg, zero_key=None, zero_bias=None, mask_zero=False):
  """x [B,T,D] -> (x, a0 mean over heads [B,T])."""
  out = np.zeros_like(x)
  a0_bt = np.zeros(x.shape[:2])
  for b in range(x.shape[0]):
    h = norm(p["attn_norm"], x[b], cfg)
    a = p["attn"]
    q, k, v = (np.einsum("td,dhk->thk", h, a[f"{n}_kernel"]) + (a[f"{n}_bias"] if cfg.use_bias else 0)
               for n in "qkv")
    if cfg.position == "rope":
      q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    o, a0 = attention(q, k, v, zero_key, zero_bias, mask_zero, cfg.attention_window)
    y = x[b] + np.einsum("thk,hkd->td", o, a["o_kernel"]) + (a["o_bias"] if cfg.use_bias else 0)
    m = p["mlp"]
    h = norm(p["mlp_norm"], y, cfg)
    bias = (lambda n: m[n]) if cfg.use_bias else (lambda n: 0)
    u = h @ m["wi_kernel"] + bias("wi_bias")
    if cfg.mlp == "swiglu":
      g = h @ m["wg_kernel"] + bias("wg_bias")
      u = g / (1 + np.exp(-g)) * u
    else:
      u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    out[b] = y + u @ m["wo_kernel"] + bias("wo_bias")
    a0_bt[b] = a0.mean(0)
  return out, a0_bt


def stack(sp, x, cfg, n, zero_keys=None, zero_bias=None, mask_zero=False, frozen=None):
  """n distinct layers; zero keys from the caller or owned ('zero_key'). Returns x, a0 [n,B,T].

  frozen: (exited [B,T], state [B,T,D]): exited tokens enter every layer with their frozen state."""
  if zero_keys is None and "zero_key" in sp:
    zero_keys, zero_bias = sp["zero_key"], sp.get("zero_bias")
  a0s = []
  for j in range(n):
    if frozen is not None:
      x = np.where(frozen[0][..., None], frozen[1], x)
    x, a0 = block(layer(sp["layers"], j), x, cfg,
                  None if zero_keys is None else zero_keys[j],
                  None if zero_bias is None else zero_bias[j], mask_zero)
    a0s.append(a0)
  return x, np.stack(a0s)


def readout(p, x, cfg, mask_zero=False, through_tail=True):
  if cfg.unique_tail_layers and through_tail:
    x, _ = stack(p["tail"], x, cfg, cfg.unique_tail_layers, mask_zero=mask_zero)
  x = norm(p["final_norm"], x, cfg)
  w = p["embed"]["embedding"].T if cfg.tie_embeddings else p["embed"]["lm_head"]
  return x @ w


def forward(p, tokens, cfg, num_cycles=None, tau=None, min_cycles=None, granularity="token",
            mask_zero=False, signal="zero_attention", frozen_kv="state"):
  """Returns logits [B,T,V], signals [C,B,T] (0 where a token did not run the cycle; mean a0 over
  heads and layers, or with signal='confidence' the max softmax prob of the cycle's read-out),
  cycles_used [B,T], states [C,B,T,D] (state after each cycle)."""
  C = cfg.cycles if num_cycles is None else num_cycles
  min_cycles = cfg.min_cycles if min_cycles is None else min_cycles
  B, T = tokens.shape
  x = p["embed"]["embedding"][tokens]
  if cfg.position == "learned":
    x = x + p["embed"]["pos_embedding"][:T]
  if cfg.unique_head_layers:
    x, _ = stack(p["head"], x, cfg, cfg.unique_head_layers, mask_zero=mask_zero)
  exited = np.zeros((B, T), bool)
  used = np.zeros((B, T), np.int32)
  signals, states = [], []
  for c in range(C):
    row = min(c, cfg.cycles - 1)
    keys = p["zero_key_pool"][row] if cfg.use_zero_token else None
    bias = p["zero_bias_pool"][row] if cfg.use_zero_token and cfg.zero_bias else None
    frozen = (exited, x) if frozen_kv == "state" and tau is not None else None
    new_x, a0 = stack(p["middle"], x, cfg, cfg.stack_layers, keys, bias, mask_zero, frozen)
    s = a0.mean(0)
    if signal == "confidence":
      logits = readout(p, new_x, cfg, mask_zero, through_tail=cfg.cycle_readout == "tail")
      e = np.exp(logits - logits.max(-1, keepdims=True))
      s = (e / e.sum(-1, keepdims=True)).max(-1)
    ran = ~exited
    x = np.where(exited[..., None], x, new_x)
    used += ran
    if tau is not None and c + 1 >= min_cycles:
      if granularity == "sequence":
        hit = np.repeat(s.mean(1, keepdims=True) >= tau, T, axis=1)
      else:
        hit = s >= tau
      exited = exited | hit
    signals.append(np.where(ran, s, 0.0))
    states.append(x.copy())
  return readout(p, x, cfg, mask_zero), np.stack(signals), used, np.stack(states)


def gap_thresholds(values):
  """Candidate thresholds in the middle of gaps among the central values, widest gap first, so that
  float32 vs float64 rounding cannot flip an exit decision."""
  v = np.unique(np.asarray(values).ravel())
  seg = v[len(v) // 4: 3 * len(v) // 4 + 1]
  gaps = np.diff(seg)
  return [float((seg[i] + seg[i + 1]) / 2) for i in np.argsort(-gaps)]
