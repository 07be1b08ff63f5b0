"""`ZTTModel`: embed -> head -> cycled middle -> tail -> logits.

Param tree (every leaf is an `nn.Partitioned` box after init; logical axes in brackets;
L_head = n_head_layers, k = n_middle_layers, L_tail = n_tail_layers, D = d_model, H = num_heads,
K = head_dim, F = mlp_dim, V = vocab_size, C = the config's cycles, S = cycled-stack size):

  embed/embedding                 [V, D]        (vocab, embed)       also the LM head when tied
  embed/pos_embedding             [max_seq_len, D] (length, embed)   position=learned only
  embed/lm_head                   [D, V]        (embed, vocab)       tie_embeddings=False only
  embed/shift_kernel              [D, D]        (embed, -)           token_shift only (init 0)
  head/layers/...                 block params, leading axis L_head ('layers')   absent if shared/0
  head/zero_key                   [L_head, H, K] (layers, heads, kv) zero_token_layers=all only
  head/zero_bias                  [L_head, H]   (layers, heads)      ... and zero_bias only
  middle/layers/...               block params, leading axis S ('layers'); shared by every cycle
  zero_key_pool                   [C, S, H, K]  (cycles, layers, heads, kv)   zero token only
  zero_bias_pool                  [C, S, H]     (cycles, layers, heads)       ... and zero_bias only
  tail/layers/..., tail/zero_key, tail/zero_bias   as head, leading axis L_tail
  final_norm/scale [D] (embed), final_norm/bias [D] (layernorm only)
  inject/norm/..., inject/kernel [D, D] (embed, -)   input_injection != none only (kernel init 0)
  exit_gate/norm/..., exit_gate/kernel [D] (embed), exit_gate/bias [1]   exit_gate only

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
last row (training, evaluation and cached decoding alike). Zero keys get no RoPE and their value is
zero (see attention.py).

Training (`__call__`) and cached decoding (`extend`) run the same cycle step, `ZTTModel.cycle`: the
one place where a cycle updates the state and the exits (input injection and the exit gate included).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax.errors import ConfigError
from ztt_jax.loss import LMHead
from ztt_jax.model.attention import ring_keys
from ztt_jax.model.block import LayerStack, zero_key_init
from ztt_jax.model.config import ModelConfig
from ztt_jax.model.cycle import CycleOut, CycleState, ExitGate, InputInjection
from ztt_jax.model.exit import ExitRule, confidence, state_delta, zero_attention_delta
from ztt_jax.model.layers import Embedder, Norm, logical_param

Array = jax.Array


def count_params(params: Any, include_pool: bool = True) -> int:
  """Unique (stored) parameter count; shared cycles count once. Accepts boxed or unboxed trees of
  arrays or of jax.ShapeDtypeStruct (from jax.eval_shape)."""
  params = nn.unbox(params)
  if not include_pool:
    params = {k: v for k, v in params.items() if k not in ("zero_key_pool", "zero_bias_pool")}
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def readout_cycles(cfg: ModelConfig, num_cycles: int) -> tuple[int, ...]:
  """The cycles (0-based) read out for deep supervision and the a0 target: every
  cfg.cycle_loss_every-th one, and the last."""
  k = cfg.cycle_loss_every
  return tuple(c for c in range(num_cycles) if (c + 1) % k == 0 or c == num_cycles - 1)


class ZTTModel(nn.Module):
  """Decoder-only LM with head/tail-decoupled cycling and the zero-token exit signal.

  `cfg` may be a ModelConfig, a dict or an ml_collections ConfigDict (the `model` section).
  mask_zero_slot: ablation and test hook; every zero slot's logit becomes -inf (a0 = 0), which makes
    the arithmetic that of attention without a zero slot. Params are the same. A bool, or a traced
    bool array (then build the module inside the jitted function; one compile serves both values).
  """
  cfg: Any
  mask_zero_slot: bool = False

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
    if cfg.input_injection != "none":
      self.inject = InputInjection(cfg)
    if cfg.exit_gate:
      self.exit_gate = ExitGate(cfg)

  # ---------------------------------------------------------------- pieces

  def _mask(self) -> Optional[Array]:
    return jnp.asarray(self.mask_zero_slot, bool) if self.cfg.use_zero_token else None

  def _rule(self, rule: Optional[ExitRule]) -> ExitRule:
    """rule None: no exit. The threshold becomes a float32 array (traced if it came in traced)."""
    rule = ExitRule() if rule is None else rule
    if not isinstance(rule, ExitRule):
      raise TypeError(f"rule={rule!r}: pass an ExitRule, e.g. ExitRule.from_config(cfg, threshold=0.5)")
    rule.check(self.cfg)
    return rule.replace(threshold=jnp.asarray(rule.threshold, jnp.float32)) if rule.exits else rule

  def _zero_xs(self, c: Array):
    """(zero keys, zero bias) of cycle(s) c (int32, any shape): pool row min(c, C_pool - 1)."""
    cfg = self.cfg
    if not cfg.use_zero_token:
      return None, None
    row = jnp.minimum(c, cfg.cycles - 1)
    return self.zero_key_pool[row], (self.zero_bias_pool[row] if cfg.zero_bias else None)

  def lm_head(self) -> LMHead:
    """The LM head (tied embedding or lm_head) in the compute dtype, for ztt_jax/loss.py."""
    return self.embed.head()

  def lm_logits(self, x_BxTxD: Array) -> Array:
    """final norm -> LM head; float32 logits."""
    return self.embed.decode(self.final_norm(x_BxTxD))

  def read_hidden(self, x_BxTxD: Array) -> Array:
    """tail -> final norm: what the LM head reads."""
    if self.cfg.unique_tail_layers:
      x_BxTxD = self.tail(x_BxTxD, mask_zero_slot=self._mask()).x
    return self.final_norm(x_BxTxD)

  def readout(self, x_BxTxD: Array) -> Array:
    """tail -> final norm -> LM head; float32 logits."""
    return self.embed.decode(self.read_hidden(x_BxTxD))

  def cycle_readout(self, x_BxTxD: Array) -> Array:
    """The read-out of a cycle before the last (model.cycle_readout); float32 logits."""
    return self.readout(x_BxTxD) if self.cfg.cycle_readout == "tail" else self.lm_logits(x_BxTxD)

  def cycle(self, state: CycleState, c: Array, zero_xs, rule: ExitRule, *, kv: Optional[dict] = None,
            positions_T: Optional[Array] = None) -> tuple[CycleState, CycleOut]:
    """Cycle c (0-based) of the middle stack: the one place where a cycle updates the state and the
    exit bookkeeping, for training and cached decoding alike.

    A token that has exited keeps its state and its cycle count; with frozen_kv='state' each layer
    also sees it as its frozen state (so its K/V are projections of that state). kv, positions_T:
    this cycle's cache and the new tokens' positions (cached decoding).
    """
    frozen = (state.exited_BxT, state.x_BxTxD) if rule.exits and rule.frozen_kv == "state" else None
    # Injection changes what the stack sees, not the state a token keeps (and shows once frozen).
    x_in_BxTxD = state.x_BxTxD if state.inject_BxTxD is None else state.x_BxTxD + state.inject_BxTxD
    out = self.middle(x_in_BxTxD, *zero_xs, self._mask(), frozen, kv=kv, positions_T=positions_T, cycle=c)
    za_BxT = jnp.mean(out.a0, axis=0).astype(jnp.float32)
    ran_BxT = ~state.exited_BxT
    lam_BxT, survival_BxT = None, state.survival_BxT
    if self.cfg.exit_gate:
      lam_BxT = self.exit_gate(out.x)
      survival_BxT = jnp.where(ran_BxT, survival_BxT * (1.0 - lam_BxT), survival_BxT)
    # Only the rule's own signal is computed (confidence costs a read-out).
    signals = {
        "zero_attention": lambda: za_BxT,
        "zero_attention_last": lambda: out.a0[-1].astype(jnp.float32),
        "zero_attention_delta": lambda: zero_attention_delta(state.zero_attention_BxT, za_BxT, c == 0),
        "state_delta": lambda: state_delta(state.x_BxTxD, out.x),
        "confidence": lambda: confidence(self.cycle_readout(out.x)),
        "gate": lambda: 1.0 - survival_BxT,  # the CDF of the gate's exit distribution after this cycle
    }
    sig_BxT = signals[rule.signal]()
    x_BxTxD = jnp.where(state.exited_BxT[..., None], state.x_BxTxD, out.x)
    used_BxT = state.used_BxT + ran_BxT.astype(jnp.int32)
    exited_BxT = rule.update(state.exited_BxT, sig_BxT, c + 1) if rule.exits else state.exited_BxT
    masked = lambda a: None if a is None else jnp.where(ran_BxT, a, 0.0)  # noqa: E731
    report = CycleOut(masked(za_BxT), masked(sig_BxT), out.kv, masked(lam_BxT))
    return state.replace(x_BxTxD=x_BxTxD, exited_BxT=exited_BxT, used_BxT=used_BxT, survival_BxT=survival_BxT,
                         zero_attention_BxT=jnp.where(ran_BxT, za_BxT, state.zero_attention_BxT)), report

  def start_state(self, x_head_BxTxD: Array, x_embed_BxTxD: Array) -> CycleState:
    """The state entering cycle 0 (the head's output), with the injection every cycle adds."""
    src = {"head": x_head_BxTxD, "embed": x_embed_BxTxD}.get(self.cfg.input_injection)
    inject_BxTxD = None if src is None else self.inject(src)
    return CycleState.start(x_head_BxTxD, inject_BxTxD, gate=self.cfg.exit_gate)

  # ---------------------------------------------------------------- training and evaluation

  def __call__(self, tokens_BxT: Array, rule: Optional[ExitRule] = None, num_cycles: Optional[int] = None,
               readout: bool = True):
    """Returns (logits_BxTxV float32, aux).

    rule: the exit rule (model.exit.ExitRule); None = no exit (training). Its threshold may be
      traced. Build the configured one with ExitRule.from_config(cfg).
    num_cycles: cycles to run (static int); default cfg.cycles. Rows beyond the pool reuse the last.
    readout: False returns the hidden states the LM head reads (after the final norm) instead of
      logits, [B,T,D] in the compute dtype, and aux['cycle_hidden'] [R,B,T,D] (the last row is the
      final one) instead of aux['cycle_logits']: the loss path (ztt_jax/loss.py, with `lm_head`)
      never holds [B,T,V] logits.

    aux: zero_attention [C,B,T] (mean a0 of the cycle; 0 for cycles a token did not run and for
    variants without the zero token), exit_signal [C,B,T] (the signal the rule used, same masking),
    cycles_used [B,T] int32, cycle_logits [R,B,T,V] float32 when cfg.cycle_loss_weight > 0,
    cfg.exit_gate or cfg.zero_attention_target_weight > 0 (the R cycles of readout_cycles: every one
    unless cfg.cycle_loss_every > 1), exit_gate [C,B,T] (the halting probabilities lambda_c, same
    masking) with cfg.exit_gate.
    """
    cfg: ModelConfig = self.cfg
    rule = self._rule(rule)
    C = cfg.cycles if num_cycles is None else int(num_cycles)
    if C < 1:
      raise ConfigError(f"num_cycles={num_cycles}: must be >= 1")
    collect_states = cfg.cycle_loss_weight > 0 or cfg.exit_gate or cfg.zero_attention_target_weight > 0
    e_BxTxD = self.embed.encode(tokens_BxT)
    x_BxTxD = self.head(e_BxTxD, mask_zero_slot=self._mask()).x if cfg.unique_head_layers else e_BxTxD
    state, (za_CxBxT, sig_CxBxT, states_CxBxTxD, lam_CxBxT) = self._cycles(
        self.start_state(x_BxTxD, e_BxTxD), C, rule, collect_states)
    aux = {"zero_attention": za_CxBxT, "exit_signal": sig_CxBxT, "cycles_used": state.used_BxT}
    if cfg.exit_gate:
      aux["exit_gate"] = lam_CxBxT
    if not collect_states:
      h_BxTxD = self.read_hidden(state.x_BxTxD)
      return (h_BxTxD, aux) if not readout else (self.embed.decode(h_BxTxD), aux)
    B, T, D = state.x_BxTxD.shape
    rows = readout_cycles(cfg, C)
    R = len(rows)
    states_RxBxTxD = states_CxBxTxD if R == C else states_CxBxTxD[np.asarray(rows)]
    if cfg.cycle_readout == "tail" or R == 1:
      h_RxBxTxD = self._read_hidden_per_cycle(states_RxBxTxD)
    else:
      h_RxBxTxD = jnp.concatenate([self.final_norm(states_RxBxTxD[:-1]), self.read_hidden(states_RxBxTxD[-1])[None]])
    if not readout:
      aux["cycle_hidden"] = h_RxBxTxD
      return h_RxBxTxD[-1], aux
    cyc_RxBxTxV = self.embed.decode(h_RxBxTxD.reshape(R * B, T, D)).reshape(R, B, T, -1)
    aux["cycle_logits"] = cyc_RxBxTxV
    return cyc_RxBxTxV[-1], aux

  def _read_hidden_per_cycle(self, states_CxBxTxD: Array) -> Array:
    """read_hidden of every cycle's state, one cycle at a time: the tail's working set (its MLP
    activations, forward and backward) is that of one batch, not of C batches at once."""
    def body(mdl, _, x_BxTxD):
      return None, mdl.read_hidden(x_BxTxD)

    # Under nothing_saveable a read-out keeps nothing but the state it reads (the tails' saved inputs
    # are 0.3 GiB at GPT-2 small, C = 4). The default policy keeps the tail's matmul outputs (1.3 GiB
    # there) rather than run the tail's forward pass a third time.
    if self.cfg.remat_policy == "nothing_saveable":
      body = nn.remat(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=states_CxBxTxD.shape[0])
    return scan(self, None, states_CxBxTxD)[1]

  def _cycles(self, state: CycleState, C: int, rule: ExitRule, collect_states: bool):
    """C cycles. With backprop_cycles=k < C the first C - k run on stop-gradient inputs and params
    (no tangents, so nothing is saved for their backward pass) and the state entering cycle C - k
    is a constant: the gradient is that of the last k cycles. At init every cycle runs plainly."""
    k = self.cfg.backprop_cycles
    if not k or k >= C or self.is_initializing():
      return self._scan_cycles(state, 0, C, rule, collect_states)
    sg = jax.lax.stop_gradient
    early = state.replace(x_BxTxD=sg(state.x_BxTxD), inject_BxTxD=sg(state.inject_BxTxD))
    early, ys_early = self._scan_cycles(early, 0, C - k, rule, collect_states, no_grad=True)
    # The injection keeps its gradient in the last k cycles: only the state is cut.
    late = early.replace(x_BxTxD=sg(early.x_BxTxD), inject_BxTxD=state.inject_BxTxD)
    state, ys_late = self._scan_cycles(late, C - k, C, rule, collect_states)
    return state, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_early, ys_late)

  def _scan_cycles(self, state: CycleState, start: int, stop: int, rule: ExitRule, collect_states: bool,
                   no_grad: bool = False):
    """Cycles start..stop-1 in one nn.scan (params broadcast: every cycle shares them). no_grad:
    every param but the exit gate's and the pool rows enter under stop_gradient."""
    gate = self.cfg.exit_gate

    def run(mdl, state, xs, rule):
      c, zero_xs = xs
      state, out = mdl.cycle(state, c, zero_xs, rule)
      return state, (out.zero_attention_BxT, out.signal_BxT, state.x_BxTxD if collect_states else None,
                     out.gate_BxT)

    def skip(mdl, state, xs, rule):
      zeros_BxT = jnp.zeros(state.exited_BxT.shape, jnp.float32)
      return state, (zeros_BxT, zeros_BxT, state.x_BxTxD if collect_states else None,
                     zeros_BxT if gate else None)

    def body(mdl, state, xs, rule):
      # Skipping is not differentiable, and at init every cycle must run to create the params.
      if rule.skip_exited and not self.is_initializing():
        return nn.cond(jnp.all(state.exited_BxT), skip, run, mdl, state, xs, rule)
      return run(mdl, state, xs, rule)

    if no_grad:
      body = nn.map_variables(body, "params", trans_in_fn=_stop_gradient_but_gate)
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(0, nn.broadcast), length=stop - start)
    c_C = jnp.arange(start, stop, dtype=jnp.int32)
    zero_xs = self._zero_xs(c_C)
    if no_grad:
      zero_xs = jax.lax.stop_gradient(zero_xs)
    return scan(self, state, (c_C, zero_xs), rule)

  # ---------------------------------------------------------------- cached decoding

  def extend(self, tokens_BxT: Array, cache: dict, offset, rule: Optional[ExitRule] = None):
    """Cached decoding: logits of T new tokens at positions offset.. given the K/V cache of the
    positions before (ztt_jax/decoding.py allocates it; layout there). Jit-able; offset may be traced.

    The cycles run in a while loop that stops as soon as every new token has exited
    (frozen_kv='state'), so a token that exits after cycle c runs no attention or MLP in the cycles
    after. Their cache entries are filled from its frozen state, which is what `__call__` computes
    with the same rule. The cache holds one entry per cycle to run (its middle leading axis), which
    may exceed the pool. Params must exist (`init` runs `__call__`).

    rule: None = no exit; exits per token (a decoding step has no later tokens) on any signal but
      confidence (it would need a tail cache per cycle).
    Returns (logits_BxTxV float32, cache, aux) with aux cycles_used [B,T] int32, zero_attention and
    exit_signal [C,B,T] (0 for cycles a token did not run), as `__call__`.
    """
    cfg = self.cfg
    rule = self._rule(rule)
    if rule.signal == "confidence" or (rule.exits and rule.granularity != "token"):
      raise ConfigError(f"cached decoding exits per token on any signal but confidence; got "
                        f"signal={rule.signal!r}, granularity={rule.granularity!r}")
    offset = jnp.asarray(offset, jnp.int32)
    positions_T = offset + jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32)
    cache = dict(cache)
    e_BxTxD = x_BxTxD = self.embed.encode(tokens_BxT, offset, cache.get("prev_token"))
    if cfg.token_shift:
      cache["prev_token"] = tokens_BxT[:, -1].astype(jnp.int32)
    if cfg.unique_head_layers:
      out = self.head(x_BxTxD, mask_zero_slot=self._mask(), kv=cache["head"], positions_T=positions_T)
      x_BxTxD, cache["head"] = out.x, out.kv
    state, (za_CxBxT, sig_CxBxT), cache["middle"] = self._while_cycles(
        self.start_state(x_BxTxD, e_BxTxD), cache["middle"], positions_T, rule)
    x_BxTxD = state.x_BxTxD
    if cfg.unique_tail_layers:
      out = self.tail(x_BxTxD, mask_zero_slot=self._mask(), kv=cache["tail"], positions_T=positions_T)
      x_BxTxD, cache["tail"] = out.x, out.kv
    return self.lm_logits(x_BxTxD), cache, {"cycles_used": state.used_BxT, "zero_attention": za_CxBxT,
                                            "exit_signal": sig_CxBxT}

  def _while_cycles(self, state: CycleState, kv: dict, positions_T: Array, rule: ExitRule):
    """The cycles of `extend`: kv {'k','v'} [C, S, B, M, H, K] holds every cycle's cache. Returns the
    state, (zero attention, exit signal) [C,B,T] and the cache."""
    C = kv["k"].shape[0]
    skip = rule.exits and rule.frozen_kv == "state"

    def body(mdl, carry):
      c, state, ys, kv = carry
      kv_c = jax.tree.map(lambda a: a[c], kv)
      state, out = mdl.cycle(state, c, mdl._zero_xs(c), rule, kv=kv_c, positions_T=positions_T)
      kv = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, c, 0), kv, out.kv)
      ys = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, c, 0), ys,
                        (out.zero_attention_BxT, out.signal_BxT))
      return c + 1, state, ys, kv

    def more(mdl, carry):
      c, state = carry[0], carry[1]
      return (c < C) & ~jnp.all(state.exited_BxT) if skip else c < C

    zeros_CxBxT = jnp.zeros((C,) + state.exited_BxT.shape, jnp.float32)
    c_end, state, ys, kv = nn.while_loop(more, body, self, (jnp.int32(0), state, (zeros_CxBxT, zeros_CxBxT), kv))
    if skip:
      kv = nn.cond(c_end < C, _fill_frozen_kv, lambda mdl, kv, *_: kv, self, kv, state.x_BxTxD, c_end,
                   positions_T)
    return state, ys, kv


def _fill_frozen_kv(mdl: ZTTModel, kv: dict, x_BxTxD: Array, c_end: Array, positions_T: Array) -> dict:
  """Cache entries of cycles c_end.. when every new token is frozen in x: each of those cycles would
  project each layer's K/V from x, and the middle params are shared by all cycles, so one projection
  per layer fills every skipped cycle."""
  C, S = kv["k"].shape[:2]
  # [1 or C, S, B, T, H, K] each; per-cycle LoRA (model/lora.py) gives each cycle its own K/V.
  cycles = range(C) if mdl.cfg.cycle_lora_rank else [None]
  new = jax.tree.map(lambda *a: jnp.stack(a), *[
      mdl.middle(x_BxTxD, positions_T=positions_T, kv_only=True, cycle=c).kv for c in cycles])
  B, T = x_BxTxD.shape[:2]
  later_C = (jnp.arange(C) >= c_end)[:, None, None, None, None, None]
  start = (0, 0, 0, positions_T[0], 0, 0)

  def put(a, new):
    if mdl.cfg.attention_window is not None:  # a rolling cache: write the ring, keep cycles < c_end
      ring = ring_keys(a, jnp.broadcast_to(new, (C,) + new.shape[1:]), positions_T[0], axis=3)[1]
      return jnp.where(later_C, ring, a)
    cur = jax.lax.dynamic_slice(a, start, (C, S, B, T) + a.shape[-2:])
    return jax.lax.dynamic_update_slice(a, jnp.where(later_C, new.astype(a.dtype), cur), start)

  return jax.tree.map(put, kv, new)


def _stop_gradient_but_gate(variables: dict) -> dict:
  """The variables of the stopped cycles (backprop_cycles): constants, except the exit gate's probe,
  which learns to halt at every cycle."""
  return {col: {name: v if name == "exit_gate" else jax.lax.stop_gradient(v) for name, v in tree.items()}
          for col, tree in variables.items()}
