"""A pre-trained model's layers -> a ztt_jax param tree, whatever family they came from.

Input: the non-layer params (`top`, already in ztt_jax's tree) and one block-param dict per layer
(no 'layers' axis), as a family's mapping reads them.

vanilla: all n_layer layers in one stack (n_head_layers=0, n_middle_layers=n_layer,
n_tail_layers=0): the same function as the source model.

ztt: layer 0 becomes the head, layer n_layer-1 the tail, and the m = n_layer-2 layers between
them are folded onto a shared stack of k layers (default k = m // num_cycles, so head + C*k + tail
is at most the original depth) that runs num_cycles times:
  copy     shared layer j = middle layer j (the first k middle layers; the rest are dropped).
  average  the m middle layers are split, in order, into k consecutive groups of as equal size as
           possible (numpy.array_split), and shared layer j is the element-wise mean of every param
           of group j (norms included). With k = m every group has one layer (same as copy).
The zero-key pool starts at zero keys plus a per-(cycle, layer, head) learned bias on the zero
slot's logit of zero_bias_init (default -10), so a0 = e^b / (e^b + sum_j e^(s_j)) is about e^-10
times smaller than the attention's own weights and the converted model starts as the pre-trained
layers would compute (up to the layers that copy/average changed), while the bias can still learn.

lora_rank = r > 0 (needs m = num_cycles * k): per-cycle LoRA on the shared layers (model/lora.py).
Cycle c of shared layer j stands for original middle layer c*k + j: its deltas are a truncated SVD
of (that layer - the shared one) and its norm scales that layer's own, so at full rank the ZTT
computes the original model (up to the zero slot's e^-10 mass) and at r the best rank-r start.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from ztt_jax.convert import ConvertError
from ztt_jax.model import ModelConfig

MIDDLE_INITS = ("copy", "average")


def stack(layers: list[dict]) -> dict:
  return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def _mean(layers: list[dict]) -> dict:
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *layers)


def to_vanilla(cfg: ModelConfig, top: dict, layers: list[dict]) -> tuple[ModelConfig, dict]:
  return cfg, {**top, "middle": {"layers": stack(layers)}}


# Kernels that get per-cycle LoRA deltas: (sub-module, name, number of input axes).
LORA_KERNELS = (("attn", "q", 1), ("attn", "k", 1), ("attn", "v", 1), ("attn", "o", 2),
                ("mlp", "wi", 1), ("mlp", "wg", 1), ("mlp", "wo", 1))


def _low_rank(w: np.ndarray, n_in: int, r: int) -> tuple[np.ndarray, np.ndarray]:
  """(a [*in, r], b [r, *out]) with a b the best rank-r approximation of w [*in, *out] (truncated
  SVD, the singular values split evenly; zero-padded when r exceeds the matrix's rank)."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  u, sv, vt = np.linalg.svd(w.reshape(int(np.prod(in_shape)), -1).astype(np.float64), full_matrices=False)
  n = min(r, sv.size)
  a = np.zeros((u.shape[0], r)); b = np.zeros((r, vt.shape[1]))  # noqa: E702
  a[:, :n], b[:n] = u[:, :n] * np.sqrt(sv[:n]), np.sqrt(sv[:n])[:, None] * vt[:n]
  return a.reshape(*in_shape, r).astype(np.float32), b.reshape(r, *out_shape).astype(np.float32)


def add_cycle_lora(shared: list[dict], middle: list[dict], num_cycles: int, r: int) -> list[dict]:
  """The shared layers with per-cycle LoRA deltas and norms (model/lora.py): cycle c of shared layer j
  stands for original middle layer c*k + j, its deltas a truncated SVD of (that layer - shared j) and
  its norm scales that layer's own. At full rank the stack computes the original layers."""
  k = len(shared)
  out = []
  for j, base in enumerate(shared):
    orig = [middle[c * k + j] for c in range(num_cycles)]
    layer = jax.tree.map(lambda a: a, base)
    for norm in ("attn_norm", "mlp_norm"):
      layer[norm] = {n: np.stack([o[norm][n] for o in orig]) for n in base[norm]}
    for sub, name, n_in in LORA_KERNELS:
      if f"{name}_kernel" not in base[sub]:
        continue  # gelu MLPs have no gate
      ab = [_low_rank(o[sub][f"{name}_kernel"] - base[sub][f"{name}_kernel"], n_in, r) for o in orig]
      layer[sub][f"{name}_lora_a"] = np.stack([a for a, _ in ab])
      layer[sub][f"{name}_lora_b"] = np.stack([b for _, b in ab])
    out.append(layer)
  return out


def to_ztt(cfg: ModelConfig, top: dict, layers: list[dict], num_cycles: int = 2,
           n_middle_layers: Optional[int] = None, middle_init: str = "copy",
           zero_bias_init: float = -10.0, lora_rank: int = 0) -> tuple[ModelConfig, dict]:
  """Head = layer 0, tail = last layer, shared middle from layers 1..L-2 (see the module docstring)."""
  L = len(layers)
  if L < 3:
    raise ConvertError(f"--to=ztt needs n_layer >= 3 (a head, at least one middle layer and a tail); "
                       f"this model has {L}. Use --to=vanilla.")
  if middle_init not in MIDDLE_INITS:
    raise ConvertError(f"--middle_init={middle_init!r}: use one of {', '.join(MIDDLE_INITS)}.")
  if not isinstance(num_cycles, int) or num_cycles < 1:
    raise ConvertError(f"--num_cycles={num_cycles}: must be a positive integer.")
  m = L - 2
  k = max(1, m // num_cycles) if n_middle_layers is None else n_middle_layers
  if not 1 <= k <= m:
    raise ConvertError(f"--n_middle_layers={k}: must be between 1 and the {m} middle layers of this model.")
  middle = layers[1:-1]
  if middle_init == "copy":
    shared = middle[:k]
  else:
    shared = [_mean([middle[i] for i in group]) for group in np.array_split(np.arange(m), k)]
  if lora_rank:
    if not isinstance(lora_rank, int) or lora_rank < 0:
      raise ConvertError(f"--lora_rank={lora_rank}: must be an integer >= 0.")
    if m != num_cycles * k:
      raise ConvertError(f"--lora_rank needs each original middle layer to be one (cycle, shared layer): "
                         f"n_layer - 2 = {m} must equal num_cycles * n_middle_layers = {num_cycles * k}.")
    if cfg.use_bias:
      raise ConvertError("--lora_rank: the deltas are low-rank matrices and biases would stay shared; "
                         "convert a bias-free (Llama-form) model, or leave --lora_rank at 0.")
    shared = add_cycle_lora(shared, middle, num_cycles, lora_rank)
  H = cfg.num_heads
  zcfg = cfg.replace(variant="ztt", num_cycles=num_cycles, n_head_layers=1, n_middle_layers=k, n_tail_layers=1,
                     zero_bias=True, zero_bias_init=float(zero_bias_init), zero_key_init="zeros",
                     zero_token_layers="middle", cycle_lora_rank=int(lora_rank)).validate()
  params = {**top,
            "head": {"layers": stack(layers[:1])},
            "middle": {"layers": stack(shared)},
            "tail": {"layers": stack(layers[-1:])},
            "zero_key_pool": np.zeros((num_cycles, k, H, cfg.head_dim), np.float32),
            "zero_bias_pool": np.full((num_cycles, k, H), zero_bias_init, np.float32)}
  return zcfg, params


def fold(to: str, cfg: ModelConfig, top: dict, layers: list[dict], **ztt_kw) -> tuple[ModelConfig, dict]:
  """`to_vanilla` or `to_ztt` (with `ztt_kw`) by name."""
  if to == "vanilla":
    return to_vanilla(cfg, top, layers)
  if to == "ztt":
    return to_ztt(cfg, top, layers, **ztt_kw)
  raise ConvertError(f"--to={to!r}: use vanilla or ztt.")
