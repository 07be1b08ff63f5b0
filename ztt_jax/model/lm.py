"""`ZTTModel`: embed -> head -> cycled middle -> tail -> logits.

Param tree (every leaf is an `nn.Partitioned` box after init; logical axes in brackets;
L_head = n_head_layers, k = n_middle_layers, L_tail = n_tail_layers, D = d_model, H = num_heads,
K = head_dim, F = mlp_dim, V = vocab_size, C = the config's cycles, S = cycled-stack size):

  embed/embedding                 [V, D]        (vocab, embed)       also the LM head when tied
  embed/pos_embedding             [max_seq_len, D] (length, embed)   position=learned only
  embed/lm_head                   [D, V]        (embed, vocab)       tie_embeddings=False only
  head/layers/...                 block params, leading axis L_head ('layers')   absent if shared/0
  head/zero_key                   [L_head, H, K] (layers, heads, kv) zero_token_layers=all only
  head/zero_bias                  [L_head, H]   (layers, heads)      ... and zero_bias only
  middle/layers/...               block params, leading axis S ('layers'); shared by every cycle
  zero_key_pool                   [C, S, H, K]  (cycles, layers, heads, kv)   zero token only
  zero_bias_pool                  [C, S, H]     (cycles, layers, heads)       ... and zero_bias only
  tail/layers/..., tail/zero_key, tail/zero_bias   as head, leading axis L_tail
  final_norm/scale [D] (embed), final_norm/bias [D] (layernorm only)

Block params under `<stack>/layers/` (each with the leading 'layers' axis):
  attn_norm/scale [D], attn_norm/bias [D] (layernorm)
  attn/q_kernel, attn/k_kernel, attn/v_kernel  [D, H, K] (embed, heads, kv); attn/{q,k,v}_bias [H, K]
  attn/o_kernel [H, K, D] (heads, kv, embed); attn/o_bias [D]
  mlp_norm/scale [D], mlp_norm/bias [D] (layernorm)
  mlp/wi_kernel [D, F] (embed, mlp), mlp/wi_bias [F]; mlp/wg_kernel [D, F], mlp/wg_bias [F] (swiglu only,
  the gate: silu(x wg) * (x wi)); mlp/wo_kernel [F, D] (mlp, embed), mlp/wo_bias [D]
  Biases exist only with use_bias=True. GPT-2 form: norm=layernorm, position=learned, mlp=gelu
  (tanh approximation), use_bias=True, tie_embeddings=True; GPT-2's c_attn splits into q/k/v, c_fc is
  wi, c_proj is o / wo, ln_f is final_norm.
S = k, or L_head + k + L_tail when share_head_tail (basic_cycling: no head/ and tail/ subtrees).

Pool rows: cycle c uses row min(c, C - 1), so running more cycles than the pool holds reuses the
last row. Zero keys get no RoPE and their value is zero (see attention.py).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.errors import ConfigError
from ztt_jax.model.block import LayerStack, zero_key_init
from ztt_jax.model.config import FROZEN_KV, ModelConfig
from ztt_jax.model.exit import EXIT_SIGNALS, confidence, update_exited
from ztt_jax.model.layers import Embedder, Norm, logical_param

Array = jax.Array



def count_params(params: Any, include_pool: bool = True) -> int:
  """Unique (stored) parameter count; shared cycles count once. Accepts boxed or unboxed trees of
  arrays or of jax.ShapeDtypeStruct (from jax.eval_shape)."""
  params = nn.unbox(params)
  if not include_pool:
    params = {k: v for k, v in params.items() if k not in ("zero_key_pool", "zero_bias_pool")}
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


class ZTTModel(nn.Module):
  """Decoder-only LM with head/tail-decoupled cycling and the zero-token exit signal.

  `cfg` may be a ModelConfig, a dict or an ml_collections ConfigDict (the `model` section).
  """
  cfg: Any

  def __post_init__(self):
    object.__setattr__(self, "cfg", ModelConfig.from_any(self.cfg))
    super().__post_init__()

  @staticmethod
  def unique_params(params: Any, include_pool: bool = True) -> int:
    return count_params(params, include_pool)

  @property
  def effective_depth(self) -> int:
    """Layers applied per token on a full pass (cfg.effective_depth)."""
    return self.cfg.effective_depth

  def setup(self):
    cfg: ModelConfig = self.cfg
    zt = cfg.use_zero_token
    own = zt and cfg.zero_token_layers == "all"
    self.embed = Embedder(cfg)
    if cfg.unique_head_layers:
      self.head = LayerStack(cfg, cfg.unique_head_layers, own_zero_key=own)
    self.middle = LayerStack(cfg, cfg.stack_layers)
    if zt:
      S, H, K = cfg.stack_layers, cfg.num_heads, cfg.head_dim
      self.zero_key_pool = logical_param(self, "zero_key_pool", zero_key_init(cfg), (cfg.cycles, S, H, K),
                                         ("cycles", "layers", "heads", "kv"))
      if cfg.zero_bias:
        self.zero_bias_pool = logical_param(self, "zero_bias_pool", nn.initializers.constant(cfg.zero_bias_init),
                                            (cfg.cycles, S, H), ("cycles", "layers", "heads"))
    if cfg.unique_tail_layers:
      self.tail = LayerStack(cfg, cfg.unique_tail_layers, own_zero_key=own)
    self.final_norm = Norm(cfg)

  def readout(self, x_BxTxD: Array, mask: Optional[Array] = None) -> Array:
    """tail -> final norm -> LM head; float32 logits."""
    if self.cfg.unique_tail_layers:
      x_BxTxD, _ = self.tail(x_BxTxD, mask_zero_slot=mask)
    return self.embed.decode(self.final_norm(x_BxTxD))

  def __call__(self, tokens_BxT: Array, exit_threshold: Optional[float] = None, *,
               num_cycles: Optional[int] = None, exit_signal: str = "zero_attention",
               skip_exited: bool = False, mask_zero_slot: bool = False,
               min_cycles: Optional[int] = None, exit_granularity: Optional[str] = None,
               frozen_kv: Optional[str] = None):
    """Returns (logits_BxTxV float32, aux).

    exit_threshold: tau; None = no exit. (cfg.exit_threshold is the default callers pass here.)
    num_cycles: cycles to run (static int); default cfg.cycles. Rows beyond the pool reuse the last.
    exit_signal: 'zero_attention' (mean a0 over heads and cycled layers) or 'confidence' (max softmax
      prob of tail + LM head applied to the cycle's state).
    skip_exited: inference path; once every token of the batch has exited, the remaining cycles are
      skipped with lax.cond (not differentiable; same logits and cycles_used).
    mask_zero_slot: test hook; the zero slot's logit becomes -inf (a0 = 0).
    min_cycles, exit_granularity: override the config's values.
    frozen_kv: override cfg.frozen_kv, what an exited token shows the other tokens in the cycles
      after its exit. 'stack': it still runs through each later cycle's stack (its own result is discarded), so
      its K/V in middle layer l > 0 come from its recomputed intermediate state. 'state': every
      middle layer of every later cycle projects its K/V from the frozen state itself, so those
      cycles need no attention or MLP work for it; this is what cached decoding with real skipping
      computes (ztt_jax/decoding.py). The two agree when the stack has one layer.

    aux: zero_attention [C,B,T] (mean a0 of the cycle; 0 for cycles a token did not run and for
    variants without the zero token), exit_signal [C,B,T] (the signal the rule used, same masking),
    cycles_used [B,T] int32, cycle_logits [C,B,T,V] float32 when cfg.cycle_loss_weight > 0.
    """
    cfg: ModelConfig = self.cfg
    C = cfg.cycles if num_cycles is None else int(num_cycles)
    if C < 1:
      raise ConfigError(f"num_cycles={num_cycles}: must be >= 1")
    frozen_kv = frozen_kv or cfg.frozen_kv
    if frozen_kv not in FROZEN_KV:
      raise ConfigError(f"frozen_kv={frozen_kv!r}: use one of {', '.join(FROZEN_KV)}")
    if exit_signal not in EXIT_SIGNALS:
      raise ConfigError(f"exit_signal={exit_signal!r}: use one of {', '.join(EXIT_SIGNALS)}")
    zt = cfg.use_zero_token
    if exit_threshold is not None and exit_signal == "zero_attention" and not zt:
      raise ConfigError(f"variant {cfg.variant!r} has no zero token, so exit_signal='zero_attention' is "
                        "undefined; use exit_signal='confidence' or a variant with zero_token=True")
    min_c = cfg.min_cycles if min_cycles is None else int(min_cycles)
    granularity = exit_granularity or cfg.exit_granularity
    collect_states = cfg.cycle_loss_weight > 0
    B, T = tokens_BxT.shape

    mask = jnp.asarray(mask_zero_slot, bool) if zt else None
    x_BxTxD = self.embed.encode(tokens_BxT)
    if cfg.unique_head_layers:
      x_BxTxD, _ = self.head(x_BxTxD, mask_zero_slot=mask)

    keys_CxSxHxK = bias_CxSxH = None
    if zt:
      rows_C = jnp.minimum(jnp.arange(C), cfg.cycles - 1)
      keys_CxSxHxK = self.zero_key_pool[rows_C]
      if cfg.zero_bias:
        bias_CxSxH = self.zero_bias_pool[rows_C]

    def run_cycle(mdl, x_BxTxD, exited_BxT, used_BxT, c, keys, bias, tau, mask):
      frozen = (exited_BxT, x_BxTxD) if frozen_kv == "state" and tau is not None else None
      new_BxTxD, a0_SxBxT = mdl.middle(x_BxTxD, keys, bias, mask, frozen)
      za_BxT = jnp.mean(a0_SxBxT, axis=0)
      sig_BxT = confidence(mdl.readout(new_BxTxD, mask)) if exit_signal == "confidence" else za_BxT
      ran_BxT = ~exited_BxT
      x_BxTxD = jnp.where(exited_BxT[..., None], x_BxTxD, new_BxTxD)
      used_BxT = used_BxT + ran_BxT.astype(jnp.int32)
      if tau is not None:
        exited_BxT = update_exited(exited_BxT, sig_BxT, c + 1, tau, min_c, granularity)
      ys = (jnp.where(ran_BxT, za_BxT, 0.0), jnp.where(ran_BxT, sig_BxT, 0.0),
            x_BxTxD if collect_states else None)
      return (x_BxTxD, exited_BxT, used_BxT), ys

    def skip_cycle(mdl, x_BxTxD, exited_BxT, used_BxT, c, keys, bias, tau, mask):
      zeros_BxT = jnp.zeros((B, T), jnp.float32)
      return (x_BxTxD, exited_BxT, used_BxT), (zeros_BxT, zeros_BxT, x_BxTxD if collect_states else None)

    def cycle(mdl, carry, xs, bcast):
      c, keys, bias = xs
      tau, mask = bcast
      args = (*carry, c, keys, bias, tau, mask)
      if skip_exited and not self.is_initializing():
        return nn.cond(jnp.all(carry[1]), skip_cycle, run_cycle, mdl, *args)
      return run_cycle(mdl, *args)

    scan = nn.scan(cycle, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(0, nn.broadcast), length=C)
    carry = (x_BxTxD, jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.int32))
    tau = None if exit_threshold is None else jnp.asarray(exit_threshold, jnp.float32)
    (x_BxTxD, _, used_BxT), (za_CxBxT, sig_CxBxT, states_CxBxTxD) = scan(
        self, carry, (jnp.arange(C, dtype=jnp.int32), keys_CxSxHxK, bias_CxSxH), (tau, mask))

    aux = {"zero_attention": za_CxBxT, "exit_signal": sig_CxBxT, "cycles_used": used_BxT}
    if collect_states:
      D = x_BxTxD.shape[-1]
      cyc_CxBxTxV = self.readout(states_CxBxTxD.reshape(C * B, T, D), mask).reshape(C, B, T, -1)
      aux["cycle_logits"] = cyc_CxBxTxV
      return cyc_CxBxTxV[-1], aux
    return self.readout(x_BxTxD, mask), aux
