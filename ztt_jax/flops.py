"""FLOPs of a train step and the hardware peak they are compared with (MFU)."""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip, from vendor datasheets.
_ACCELERATOR_PEAK = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
}


def train_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward + backward (3x forward) matmul FLOPs per token over the EFFECTIVE depth.

  Every cycle recomputes the shared layers, so compute scales with head + cycles * middle + tail
  even though the parameters do not. Attention uses the PaLM convention (full, not causal, T).
  """
  return 3.0 * forward_flops_per_token(model_cfg, seq_len)


def layer_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward matmul FLOPs of one transformer layer per token (attention over a full seq_len)."""
  d, mlp_dim = model_cfg.d_model, model_cfg.mlp_dim
  attn_width = model_cfg.num_heads * model_cfg.head_dim
  proj = 4 * d * attn_width
  mlp = (3 if model_cfg.mlp == "swiglu" else 2) * d * mlp_dim
  attention = 2 * seq_len * attn_width
  return 2 * (proj + mlp) + 2 * attention


def forward_flops_per_token(model_cfg, seq_len: int, num_cycles=None) -> float:
  """Forward matmul FLOPs per token when the middle stack runs `num_cycles` cycles (default: the
  config's). Affine in the cycles, so a mean over tokens (a float) gives the mean FLOPs."""
  c = model_cfg.cycles if num_cycles is None else num_cycles
  return (model_cfg.effective_depth_at(c) * layer_flops_per_token(model_cfg, seq_len)
          + 2 * model_cfg.d_model * model_cfg.vocab_size)


def readout_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward FLOPs of one read-out (tail layers + LM head): what the confidence exit signal costs
  per cycle on top of the cycle itself."""
  return (model_cfg.unique_tail_layers * layer_flops_per_token(model_cfg, seq_len)
          + 2 * model_cfg.d_model * model_cfg.vocab_size)


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best observed float32 matmul FLOP/s of this host's CPU backend (all its cores)."""
  device = jax.local_devices(backend="cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def peak_flops(configured_per_device=None) -> float:
  """Peak FLOP/s of everything this process drives, for MFU."""
  devices = jax.local_devices()
  if configured_per_device:
    return configured_per_device * len(devices)
  kind = devices[0].device_kind.lower()
  if devices[0].platform == "cpu":
    # Fake CPU devices share the same cores, so the host's peak is the peak of all of them.
    return measured_cpu_matmul_peak()
  for name, peak in _ACCELERATOR_PEAK.items():
    if name in kind:
      return peak * len(devices)
  return float("nan")
