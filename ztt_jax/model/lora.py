"""Per-cycle LoRA on the shared stack (Relaxed Recursive Transformers, Bae et al. 2025).

With model.cycle_lora_rank = r > 0, every matmul of a cycled layer (q, k, v, o, and the MLP's wi,
wg, wo) adds a rank-r delta of its own per cycle: W x + B_c (A_c x). A_c [C, in..., r] starts
fan-in random and B_c [C, r, out...] at zero, so training starts from the shared weights; a
conversion (`ztt_jax.convert.fold`, --lora_rank) sets them from a truncated SVD of each original
layer minus the shared one. The layers' norm scales are per cycle too (model/layers.Norm), so at
full rank the converted stack computes the original layers exactly. Cycle c uses row min(c, C - 1),
as the zero-key pool does. Params sit beside their base kernel: `<name>_lora_a`, `<name>_lora_b`,
with the base matrix's logical axes plus 'cycles' and 'lora' (the rank: replicated).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _param(module: nn.Module, name: str, init, shape, axes):
  # layers.logical_param's one line, here because layers imports this module.
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                      jnp.dtype(module.cfg.param_dtype))


def active(cfg, cycle: Optional[Array]) -> bool:
  """LoRA runs in the cycled stack (which passes its cycle index) when the rank is > 0."""
  return cycle is not None and cfg.cycle_lora_rank > 0


def row(cfg, cycle: Array) -> Array:
  return jnp.minimum(cycle, cfg.cycles - 1)


def delta(module: nn.Module, name: str, x: Array, spec_in: str, in_shape: Sequence[int], in_axes: Sequence[str],
          spec_out: str, out_shape: Sequence[int], out_axes: Sequence[str], cycle: Array) -> Array:
  """B_c (A_c x) for the kernel `name`: x [B, T, *in] (einsum letters spec_in) -> [B, T, *out]."""
  cfg = module.cfg
  C, r, dt = cfg.cycles, cfg.cycle_lora_rank, jnp.dtype(cfg.dtype)
  n_in = len(in_shape)
  a_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(1, n_in + 1)),
                                            out_axis=-1, batch_axis=(0,))
  a = _param(module, f"{name}_lora_a", a_init, (C, *in_shape, r), ("cycles", *in_axes, "lora"))
  b = _param(module, f"{name}_lora_b", nn.initializers.zeros, (C, r, *out_shape),
                    ("cycles", "lora", *out_axes))
  i = row(cfg, cycle)
  u_BxTxR = jnp.einsum(f"bt{spec_in},{spec_in}r->btr", x, a[i].astype(dt))
  return jnp.einsum(f"btr,r{spec_out}->bt{spec_out}", u_BxTxR, b[i].astype(dt))


def flops_per_layer(cfg) -> float:
  """Forward FLOPs per token of one cycled layer's deltas: 2 r (in + out) per matmul."""
  r = getattr(cfg, "cycle_lora_rank", 0)
  if not r:
    return 0.0
  d, f = cfg.d_model, cfg.mlp_dim
  hk, gk = cfg.num_heads * cfg.head_dim, (getattr(cfg, "num_kv_heads", None) or cfg.num_heads) * cfg.head_dim
  mlp = (3 if cfg.mlp == "swiglu" else 2) * (d + f)
  return 2.0 * r * ((d + hk) * 2 + (d + gk) * 2 + mlp)
