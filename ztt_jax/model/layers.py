"""Building blocks: norms, RoPE, MLP, token/position embedding.

Every param is created with `self.param` under `nn.with_logical_partitioning`, and projections are
plain `jnp.einsum` (Flax 0.12.8's DenseGeneral breaks under `jax.set_mesh` with partitioned kernels).
Params are stored in `cfg.param_dtype` and cast to the compute dtype at use.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.loss import LMHead, head_logits
from ztt_jax.model import lora
from ztt_jax.model.config import ModelConfig

Array = jax.Array


def dtype_of(name: str):
  return jnp.dtype(name)


def logical_param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None]):
  cfg: ModelConfig = module.cfg
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                      dtype_of(cfg.param_dtype))


def fan_in_init(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis)


def constrain(x_BxTxD: Array) -> Array:
  return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis; statistics in float32. In a cycled layer with per-cycle
  LoRA (`cycle` given, model.cycle_lora_rank > 0) scale and bias are per cycle, [C, D] (model/lora.py)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, cycle: Optional[Array] = None) -> Array:
    cfg = self.cfg
    per_cycle = lora.active(cfg, cycle)
    shape, axes = ((cfg.cycles, cfg.d_model), ("cycles", "embed")) if per_cycle else ((cfg.d_model,), ("embed",))
    pick = (lambda p: p[lora.row(cfg, cycle)]) if per_cycle else (lambda p: p)  # noqa: E731
    x = x_BxTxD.astype(jnp.float32)
    scale_D = pick(logical_param(self, "scale", nn.initializers.ones, shape, axes))
    if cfg.norm == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    y = x * scale_D.astype(jnp.float32)
    if cfg.norm == "layernorm":
      y = y + pick(logical_param(self, "bias", nn.initializers.zeros, shape, axes)).astype(jnp.float32)
    return y.astype(dtype_of(cfg.dtype))


def apply_rope(x_BxTxHxK: Array, positions_T: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half convention, computed in float32."""
  half = x_BxTxHxK.shape[-1] // 2
  freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang_TxK2 = positions_T.astype(jnp.float32)[:, None] * freq_K2[None, :]
  sin, cos = jnp.sin(ang_TxK2)[None, :, None, :], jnp.cos(ang_TxK2)[None, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


class Mlp(nn.Module):
  """swiglu: wo(silu(x wg) * (x wi)); gelu: wo(gelu_tanh(x wi + bi)) + bo."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, cycle: Optional[Array] = None) -> Array:
    """cycle: the cycle index in a cycled layer (per-cycle LoRA deltas, model/lora.py)."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    D, F = cfg.d_model, cfg.mlp_dim
    on = lora.active(cfg, cycle)
    up = lambda n, x: lora.delta(self, n, x, "d", (D,), ("embed",), "f", (F,), ("mlp",), cycle) if on else 0  # noqa: E731
    wi_DxF = logical_param(self, "wi_kernel", fan_in_init(0, 1), (D, F), ("embed", "mlp"))
    h_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, wi_DxF.astype(dt)) + up("wi", x_BxTxD)
    if cfg.use_bias:
      h_BxTxF = h_BxTxF + logical_param(self, "wi_bias", nn.initializers.zeros, (F,), ("mlp",)).astype(dt)
    if cfg.mlp == "swiglu":
      wg_DxF = logical_param(self, "wg_kernel", fan_in_init(0, 1), (D, F), ("embed", "mlp"))
      g_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, wg_DxF.astype(dt)) + up("wg", x_BxTxD)
      if cfg.use_bias:
        g_BxTxF = g_BxTxF + logical_param(self, "wg_bias", nn.initializers.zeros, (F,), ("mlp",)).astype(dt)
      h_BxTxF = jax.nn.silu(g_BxTxF) * h_BxTxF
    else:
      h_BxTxF = jax.nn.gelu(h_BxTxF, approximate=True)
    wo_FxD = logical_param(self, "wo_kernel", fan_in_init(0, 1), (F, D), ("mlp", "embed"))
    y_BxTxD = jnp.einsum("btf,fd->btd", h_BxTxF, wo_FxD.astype(dt))
    if on:
      y_BxTxD = y_BxTxD + lora.delta(self, "wo", h_BxTxF, "f", (F,), ("mlp",), "d", (D,), ("embed",), cycle)
    if cfg.use_bias:
      y_BxTxD = y_BxTxD + logical_param(self, "wo_bias", nn.initializers.zeros, (D,), ("embed",)).astype(dt)
    return y_BxTxD


class Embedder(nn.Module):
  """Token embedding (+ learned positions) and the LM head (tied or untied)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = logical_param(self, "embedding", nn.initializers.normal(0.02),
                                   (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    if cfg.position == "learned":
      self.pos_embedding = logical_param(self, "pos_embedding", nn.initializers.normal(0.01),
                                         (cfg.max_seq_len, cfg.d_model), ("length", "embed"))
    if not cfg.tie_embeddings:
      self.lm_head = logical_param(self, "lm_head", fan_in_init(0, 1), (cfg.d_model, cfg.vocab_size),
                                   ("embed", "vocab"))
    if cfg.token_shift:
      self.shift_kernel = logical_param(self, "shift_kernel", nn.initializers.zeros, (cfg.d_model, cfg.d_model),
                                        ("embed", None))

  def encode(self, tokens_BxT: Array, offset=None, prev_token_B: Optional[Array] = None) -> Array:
    """offset: position of the first token (decoding; may be traced). None: position 0.
    prev_token_B: token_shift only, the token before tokens_BxT[:, 0] (-1: none, at position 0)."""
    cfg = self.cfg
    T = tokens_BxT.shape[1]
    x_BxTxD = jnp.take(self.embedding, tokens_BxT, axis=0)
    if cfg.token_shift:
      B = tokens_BxT.shape[0]
      prev_B = jnp.full((B,), -1, jnp.int32) if prev_token_B is None else prev_token_B
      first_Bx1xD = jnp.where((prev_B >= 0)[:, None, None],
                              jnp.take(self.embedding, jnp.maximum(prev_B, 0), axis=0)[:, None], 0.0)
      prev_BxTxD = jnp.concatenate([first_Bx1xD.astype(x_BxTxD.dtype), x_BxTxD[:, :-1]], axis=1)
      x_BxTxD = x_BxTxD + jnp.einsum("btd,de->bte", prev_BxTxD, self.shift_kernel)
    if cfg.position == "learned":
      if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len}")
      if offset is None:
        x_BxTxD = x_BxTxD + self.pos_embedding[None, :T]
      else:  # the caller checks offset + T <= max_seq_len (dynamic_slice would clamp silently)
        x_BxTxD = x_BxTxD + jax.lax.dynamic_slice_in_dim(self.pos_embedding, offset, T)[None]
    return constrain(x_BxTxD.astype(dtype_of(cfg.dtype)))

  def head(self) -> LMHead:
    """The LM head's kernel in the compute dtype, in its stored layout (ztt_jax/loss.py)."""
    dt = dtype_of(self.cfg.dtype)
    if self.cfg.tie_embeddings:
      return LMHead(self.embedding.astype(dt), vocab_axis=0)
    return LMHead(self.lm_head.astype(dt), vocab_axis=1)

  def decode(self, x_BxTxD: Array) -> Array:
    """Logits in float32 (the matmul accumulates in float32 whatever the compute dtype)."""
    return head_logits(x_BxTxD, self.head())
