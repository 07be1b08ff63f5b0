"""What one cycle of the middle stack carries (`CycleState`), reports (`CycleOut`) and adds: the
input injection and the exit gate's probe. `ZTTModel.cycle` (lm.py) is the step that uses them.
"""
from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.model.config import ModelConfig
from ztt_jax.model.layers import Norm, constrain, dtype_of, logical_param

Array = jax.Array


@flax.struct.dataclass
class CycleState:
  """What one cycle hands the next."""
  x_BxTxD: Array
  """The state; an exited token's stays the one it had when it exited."""
  exited_BxT: Array
  """bool; exit is sticky."""
  used_BxT: Array
  """int32: cycles each token has run."""
  inject_BxTxD: Optional[Array] = None
  """input_injection: what every cycle adds to the state it feeds the middle stack (norm(e) W)."""
  survival_BxT: Optional[Array] = None
  """exit_gate: float32 prod_{j<c} (1 - lambda_j), the gate's probability of not having exited."""
  zero_attention_BxT: Optional[Array] = None
  """float32 mean a0 of the last cycle each token ran (0 before the first): what the
  zero_attention_delta signal compares with. Carried always; it is [B,T], and keeping the carry's
  structure independent of the rule keeps one state type."""

  @classmethod
  def start(cls, x_BxTxD: Array, inject_BxTxD: Optional[Array] = None, gate: bool = False) -> "CycleState":
    B, T = x_BxTxD.shape[:2]
    return cls(x_BxTxD, jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.int32), inject_BxTxD,
               jnp.ones((B, T), jnp.float32) if gate else None, jnp.zeros((B, T), jnp.float32))


@flax.struct.dataclass
class CycleOut:
  """What one cycle reports besides the new state."""
  zero_attention_BxT: Array
  """Mean a0 over heads and cycled layers; 0 for tokens that did not run this cycle."""
  signal_BxT: Array
  """The signal the rule used, same masking."""
  kv: Optional[dict] = None
  """The cycle's K/V cache {'k','v'} [S, B, M, H, K] after writing (cached decoding only)."""
  gate_BxT: Optional[Array] = None
  """exit_gate: the halting probability lambda_c, same masking."""


class InputInjection(nn.Module):
  """norm(e) W, W [D, D] zero-initialised: what each cycle adds to its input (model.input_injection)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, e_BxTxD: Array) -> Array:
    cfg = self.cfg
    w_DxD = logical_param(self, "kernel", nn.initializers.zeros, (cfg.d_model, cfg.d_model), ("embed", None))
    h_BxTxD = Norm(cfg, name="norm")(e_BxTxD)
    return constrain(jnp.einsum("btd,de->bte", h_BxTxD, w_DxD.astype(dtype_of(cfg.dtype))))


class ExitGate(nn.Module):
  """The learned exit gate's probe (model.exit_gate): lambda = sigmoid(norm(h) w + b) per token,
  float32 [B,T]. w and b start at 0 (lambda = 1/2 everywhere)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxTxD: Array) -> Array:
    cfg = self.cfg
    w_D = logical_param(self, "kernel", nn.initializers.zeros, (cfg.d_model,), ("embed",))
    b_1 = logical_param(self, "bias", nn.initializers.zeros, (1,), (None,))
    z_BxT = jnp.einsum("btd,d->bt", Norm(cfg, name="norm")(h_BxTxD).astype(jnp.float32),
                       w_D.astype(jnp.float32)) + b_1[0].astype(jnp.float32)
    return jax.nn.sigmoid(z_BxT)
