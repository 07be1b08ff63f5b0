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


def to_ztt(cfg: ModelConfig, top: dict, layers: list[dict], num_cycles: int = 2,
           n_middle_layers: Optional[int] = None, middle_init: str = "copy",
           zero_bias_init: float = -10.0) -> tuple[ModelConfig, dict]:
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
  H = cfg.num_heads
  zcfg = cfg.replace(variant="ztt", num_cycles=num_cycles, n_head_layers=1, n_middle_layers=k, n_tail_layers=1,
                     zero_bias=True, zero_bias_init=float(zero_bias_init), zero_key_init="zeros",
                     zero_token_layers="middle").validate()
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
