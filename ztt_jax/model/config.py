"""`ModelConfig`: the `model` section of the experiment config.

Every field has simple type so the dataclass maps one-to-one onto an ml_collections ConfigDict; the
docstring under each field is its documentation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ztt_jax import schema
from ztt_jax.errors import ConfigError

# Variant presets. `cycled=False` means one pass over the stack whatever `num_cycles` says.
VARIANT_PRESETS: dict[str, dict[str, bool]] = {
    "vanilla": dict(cycled=False, share_head_tail=False, zero_token=False),
    "basic_cycling": dict(cycled=True, share_head_tail=True, zero_token=False),
    "head_tail_cycling": dict(cycled=True, share_head_tail=False, zero_token=False),
    "ztt": dict(cycled=True, share_head_tail=False, zero_token=True),
}
VARIANT_ALIASES = {"bc": "basic_cycling", "htc": "head_tail_cycling"}

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu")
REMAT_POLICIES = ("none", "dots_with_no_batch_dims_saveable", "nothing_saveable")
EXIT_GRANULARITIES = ("token", "sequence")
FROZEN_KV = ("state", "stack")
ZERO_TOKEN_LAYERS = ("middle", "all")
ZERO_KEY_INITS = ("normal", "truncated_normal", "zeros")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "reference", "chunked", "cudnn", "pallas")  # ztt_jax/model/attention_impls/
EXIT_SIGNALS = ("zero_attention", "zero_attention_last", "zero_attention_delta", "state_delta", "confidence",
                "gate")  # ztt_jax/model/exit.py
ZERO_ATTENTION_SIGNALS = ("zero_attention", "zero_attention_last", "zero_attention_delta")  # need the zero token
INPUT_INJECTIONS = ("none", "head", "embed")
CYCLE_READOUTS = ("tail", "direct")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only ZTT language model (see `ztt_jax.model.lm`)."""

  vocab_size: int = 264
  """Number of token ids; the embedding and the LM head have this many rows."""
  d_model: int = 128
  """Width of the residual stream."""
  num_heads: int = 4
  """Attention heads per layer; `d_model` must be divisible by it (head_dim = d_model // num_heads)."""
  num_kv_heads: Optional[int] = None
  """Key/value heads (grouped-query attention): each serves num_heads / num_kv_heads query heads.
  None or 0: num_heads (multi-head); 1: multi-query. Must divide num_heads. The K/V cache holds only
  these heads, so decoding memory shrinks by num_heads / num_kv_heads. The zero key stays one per
  query head."""
  mlp_dim: int = 512
  """Hidden width of the MLP."""

  n_head_layers: int = 1
  """Unique layers before the cycled middle stack (0 allowed)."""
  n_middle_layers: int = 2
  """k: distinct layers in the middle stack, which is applied `num_cycles` times with the same params."""
  n_tail_layers: int = 1
  """Unique layers after the cycled middle stack (0 allowed)."""
  num_cycles: int = 4
  """C: how many times the middle stack runs (ignored by `vanilla`, which always runs one pass). Also
  the number of rows of the zero-key pool. `apply(..., num_cycles=n)` can run more or fewer cycles;
  cycles beyond the pool reuse its last row."""

  variant: str = "ztt"
  """Preset layout: vanilla | basic_cycling (alias bc) | head_tail_cycling (alias htc) | ztt.
  vanilla: every layer unique, one pass. basic_cycling: head, middle and tail form one shared stack
  cycled num_cycles times. head_tail_cycling: unique head and tail, cycled middle. ztt:
  head_tail_cycling plus the zero token."""
  zero_token: Optional[bool] = None
  """Add the zero-attention slot to the cycled layers. None takes the variant preset's value."""
  share_head_tail: Optional[bool] = None
  """Fold head and tail layers into the cycled stack (basic_cycling). None takes the preset's value."""
  zero_token_layers: str = "middle"
  """middle: only cycled layers get the zero slot (keys from the pool). all: head and tail layers also
  get their own trainable zero key."""
  zero_key_init: str = "normal"
  """Init of the zero keys: normal | truncated_normal | zeros."""
  zero_key_init_std: float = 0.02
  """Standard deviation of the zero-key init."""
  zero_bias: bool = False
  """Add a learned scalar to the zero slot's logit per (cycle, layer, head). Lets converted pretrained
  weights start with a0 ~ 0 (set zero_bias_init to e.g. -10)."""
  zero_bias_init: float = 0.0
  """Initial value of the zero-slot bias; needs zero_bias=True (validate() refuses it otherwise). A
  negative init (e.g. -3, UT+ACT's halting-bias init) starts every token with little zero attention,
  so early in training nothing exits at the first cycle: with a zero or positive bias, halting
  methods are known to collapse to shallow exits. From the command line:
  --config.model.zero_bias=True --config.model.zero_bias_init=-3."""

  max_seq_len: int = 512
  """Longest sequence; sizes the learned position table (position=learned)."""
  norm: str = "rmsnorm"
  """rmsnorm | layernorm (layernorm has a bias; GPT-2 form)."""
  norm_eps: float = 1e-5
  """Epsilon inside the norm's rsqrt."""
  position: str = "rope"
  """rope (rotary on q and k) | learned (absolute table added to the embedding; GPT-2 form)."""
  rope_theta: float = 10000.0
  """RoPE base frequency."""
  token_shift: bool = False
  """Add e_{t-1} W to each token's embedding e_t (W [D, D], zero-initialised; e_{-1} = 0): a learned
  one-token shift (RWKV's token shift, H3's shift SSM, modded-nanoGPT's smear). It hands every
  position the previous token, the feature a lookup (induction) head otherwise spends a layer
  building, so each attention layer can do one lookup of a chain. Param: embed/shift_kernel.
  Cached decoding keeps the last token in the cache (cache['prev_token'])."""
  mlp: str = "swiglu"
  """swiglu | gelu (tanh-approximate gelu, as GPT-2)."""
  use_bias: bool = False
  """Biases on the q/k/v/out and MLP projections (GPT-2 form: True)."""
  tie_embeddings: bool = True
  """Use the token embedding as the LM head."""
  dtype: str = "float32"
  """Compute dtype: float32 | bfloat16. Softmax, exit signals and logits stay float32."""
  param_dtype: str = "float32"
  """Storage dtype of the params."""
  remat_policy: str = "dots_with_no_batch_dims_saveable"
  """Rematerialisation of each scanned layer: none | dots_with_no_batch_dims_saveable | nothing_saveable."""
  attention_impl: str = "auto"
  """Zero-slot attention kernel (ztt_jax/model/attention_impls/), all the same function:
  reference (dense [B,H,T,S] scores; the oracle), chunked (blockwise online softmax with a
  flash-style backward in pure JAX: O(T * block) memory, any backend), cudnn (GPU fused kernel,
  bfloat16/float16), pallas (TPU Pallas flash kernel), auto (cudnn on GPU where it supports the
  dtype and head dim, else chunked; pallas on TPU; chunked on CPU, where it measured as fast as
  reference at T=256 and faster beyond). cudnn/pallas run the full-sequence (training) call;
  decoding against a KV cache uses chunked."""
  attention_window: Optional[int] = None
  """Sliding causal window w (Mistral, Gemma 2/3): a query at position t sees the keys at positions
  t-w+1..t (w keys, its own included) plus the zero slot, which is always visible. None: full causal
  attention. Information then moves at most w-1 positions per attention layer, so a model that
  applies n attention layers (head + C*k + tail for a looped one; token_shift adds one position)
  cannot carry a token farther than n*(w-1) (+1) positions: depth is needed by construction.
  Every attention_impl honours it: chunked skips the key blocks outside the window (O(T*w) work,
  forward and backward); cudnn takes its local window in layers without a zero slot (the zero-slot
  construction needs the zero key visible to every query, so those layers run chunked); pallas has
  no such mask (chunked). Cached decoding keeps a rolling buffer of min(w, max_len) entries per
  layer (O(w) memory) and stays exact, per-token exit included: with frozen_kv=state an exited
  token's later-cycle K/V are projections of its frozen state, written into the ring like any other."""
  attention_block_size: int = 0
  """Query and key block length of attention_impl=chunked; any sequence length works (padded and
  masked). 0: the backend's default, 128 on CPU (fastest there: the [B,H,128,128] block stays in
  cache), 512 on GPU/TPU (fewer loop iterations)."""

  exit_threshold: Optional[float] = None
  """Default tau for evaluation/generation (None = no exit). The model itself exits only when apply()
  is given an exit rule: ExitRule.from_config(cfg) builds the configured one; training passes none."""
  min_cycles: int = 1
  """A token may exit only after at least this many cycles."""
  exit_granularity: str = "token"
  """token: each token exits on its own signal. sequence: a whole sequence exits once the mean of the
  signal over its tokens reaches the threshold."""
  frozen_kv: str = "state"
  """What an exited token shows later tokens in the cycles after its exit. state: every cycled
  layer projects its K/V from the token's frozen state, so those cycles need no attention or MLP
  work for it (what cached decoding with real skipping computes). stack: the token still runs
  through each later cycle's stack and only its result is discarded, so layers after the first
  see recomputed states. The two agree when the stack has one layer."""
  exit_signal: str = "zero_attention"
  """The signal of the default exit rule (ExitRule.from_config) for evaluation and generation, each
  float32 in [0, 1], higher = readier to exit (full definitions: ExitRule in model/exit.py):
  zero_attention (mean a0 over heads and cycled layers; the paper's), zero_attention_last (mean a0
  of the last cycled layer), zero_attention_delta (1 - |a0_c - a0_{c-1}|; 0 at the first cycle),
  state_delta (1 - ||h_c - h_{c-1}|| / ||h_{c-1}||: the state has converged), confidence (max softmax
  probability of the cycle's read-out; not in cached decoding) or gate (the learned exit gate's
  cumulative exit probability; needs exit_gate). The zero_attention* signals need the zero token."""
  cycle_loss_weight: float = 0.0
  """Weight of the per-cycle (deep supervision) loss; > 0 makes apply() return aux['cycle_logits']."""
  cycle_loss_every: int = 1
  """Read out every k-th cycle for deep supervision and the a0 target: cycles k, 2k, ... (1-based)
  and always the last; 1: every cycle. Each read-out costs a tail pass and the LM head, so k cuts
  what deep supervision costs. Not with exit_gate (its expected loss needs every cycle's loss)."""

  cycle_readout: str = "tail"
  """How a cycle before the last is read out (deep supervision, the confidence exit signal, the
  exit gate's expected loss): 'tail' (tail layers -> final norm -> LM head, the final read-out
  applied early) or 'direct' (final norm -> LM head on the cycle's state, skipping the tail). The
  last cycle always goes through the tail. With 'tail' a token can look done one tail's worth of
  attention before its own state holds the answer, so when it exits, the frozen state it shows the
  other tokens lacks what the tail added; 'direct' exits only once the state itself holds it
  (measured in docs/results.md, the propagation task's exit bake-off)."""

  cycle_lora_rank: int = 0
  """Per-cycle LoRA on the shared stack (Relaxed Recursive Transformers): every matmul of a cycled
  layer (q, k, v, o, MLP) adds a rank-r delta of its own per cycle, and the cycled layers' norm
  scales become per cycle, so a conversion (--lora_rank) can start at the original model exactly
  at full rank. 0: off. Params: `<kernel>_lora_a` [C, in..., r], `<kernel>_lora_b` [C, r, out...]
  (B starts at zero) beside each kernel; see ztt_jax/model/lora.py."""

  # ---------------------------------------------------------------- looped-training recipes

  backprop_cycles: int = 0
  """Truncated backprop (Huginn: the last 8 of ~32 steps): gradients flow through only the last k
  cycles run. The state entering cycle C - k is a constant (stop_gradient), the cycles before it run
  on stop-gradient params, so they save no residuals and their pool rows get exactly zero gradient;
  memory stays that of k cycles however many run. 0: every cycle. With a random cycle count
  (train.cycles_distribution) it counts from the sampled C. Without input_injection the head then
  gets no gradient from the loss (nothing it computes reaches the last k cycles except through the
  stopped ones), so pair it with input_injection. The exit gate's probe (exit_gate) still learns
  from every cycle."""
  input_injection: str = "none"
  """Add an input back into the state at every cycle (recurrent-depth models): none | head (the
  head's output, the state entering cycle 0) | embed (the token embedding). Each cycle's middle
  stack sees x + norm(e) W with W [D, D] initialised to zero: Huginn's linear adapter on
  concat[x, e] with the state half fixed to the identity. At init it computes exactly what no
  injection computes. Training, evaluation and cached decoding all apply it (ZTTModel.cycle)."""
  exit_gate: bool = False
  """A learned exit gate (Ouro / LoopLM): after cycle c a linear probe on the normed state gives a
  halting probability lambda_c = sigmoid(norm(h_c) w + b) per token; the exit distribution is
  p(c) = lambda_c prod_{j<c} (1 - lambda_j), the last cycle taking the remaining mass. Training adds
  exit_gate_loss_weight * sum_c p(c) loss_c (the expected per-cycle loss; needs per-cycle logits,
  so apply() returns aux['cycle_logits']) and exit_gate_kl_weight * KL(p || uniform). At inference
  the signal 'gate' is the CDF 1 - prod_{j<=c} (1 - lambda_j): a token exits once it reaches the
  threshold (Ouro's exit_threshold). Params: exit_gate/{norm, kernel [D], bias [1]}."""
  exit_gate_loss_weight: float = 1.0
  """Weight of the expected per-cycle loss sum_c p(c) loss_c (exit_gate only)."""
  exit_gate_kl_weight: float = 0.1
  """Weight of KL(p || uniform over the cycles run) per scored token (exit_gate only). Keeps the exit
  distribution from collapsing onto one cycle (a geometric prior under-trains the later ones)."""
  zero_attention_target_weight: float = 0.0
  """a0 learned against a target (0: off). Raw a0 says "nothing to attend to in this layer", not
  "done": on a windowed task the hardest tokens attend to the zero slot most and exit first. This
  adds weight * mean_c sum_tokens BCE(a0_c, [argmax(read-out of cycle c) == target]) over the
  loss-weighted tokens (the right/wrong target is a constant), so each cycle's mean a0 learns to say
  "this cycle's answer is already right" and exit_signal=zero_attention at a threshold follows
  difficulty. a0 enters the BCE as eps + (1 - 2 eps) a0 (eps 1e-6), which keeps the log finite
  without a clip's dead gradient. Needs the zero token; makes apply() return aux['cycle_logits'];
  the trainer logs train/zero_attention_target_loss."""
  zero_attention_target_smoothing: float = 0.1
  """The a0 target's labels are s and 1 - s instead of 0 and 1 (zero_attention_target_weight > 0).
  With hard labels the BCE's optimum is an infinite zero-key logit, so it never stops pulling. On
  the default task the converged train loss spikes from 0.0002 to 0.01-0.7 now and then; resumed
  from step 1000, no spike came with the target off or at s = 0.1, but trained from scratch s = 0.1
  spiked as often as s = 0 (docs/results.md, "Loss spikes on the default task"). The exits it
  learns were identical. An exit threshold between s and 1 - s still separates right from wrong."""

  # ---------------------------------------------------------------- construction

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_any(cls, x: Any) -> "ModelConfig":
    """Build (and validate) from a ModelConfig, a dict or an ml_collections (Frozen)ConfigDict."""
    return schema.from_any(cls, x, "model")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- derived layout

  @property
  def canonical_variant(self) -> str:
    return VARIANT_ALIASES.get(self.variant, self.variant)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads (num_kv_heads, or num_heads when unset)."""
    return self.num_kv_heads or self.num_heads

  @property
  def use_zero_token(self) -> bool:
    if self.zero_token is not None:
      return bool(self.zero_token)
    return VARIANT_PRESETS[self.canonical_variant]["zero_token"]

  @property
  def shares_head_tail(self) -> bool:
    if self.share_head_tail is not None:
      return bool(self.share_head_tail)
    return VARIANT_PRESETS[self.canonical_variant]["share_head_tail"]

  @property
  def cycles(self) -> int:
    """Cycles run by default (and rows of the zero-key pool)."""
    return self.num_cycles if VARIANT_PRESETS[self.canonical_variant]["cycled"] else 1

  @property
  def stack_layers(self) -> int:
    """Distinct layers in the cycled stack: k, or head+k+tail when head and tail are shared."""
    if self.shares_head_tail:
      return self.n_head_layers + self.n_middle_layers + self.n_tail_layers
    return self.n_middle_layers

  @property
  def unique_head_layers(self) -> int:
    return 0 if self.shares_head_tail else self.n_head_layers

  @property
  def unique_tail_layers(self) -> int:
    return 0 if self.shares_head_tail else self.n_tail_layers

  @property
  def effective_depth(self) -> int:
    """Layers applied per token on a full pass: head + C*k + tail (C*(head+k+tail) when shared)."""
    return self.unique_head_layers + self.cycles * self.stack_layers + self.unique_tail_layers

  def effective_depth_at(self, num_cycles: int) -> int:
    return self.unique_head_layers + num_cycles * self.stack_layers + self.unique_tail_layers

  # ---------------------------------------------------------------- validation

  def validate(self) -> "ModelConfig":
    def fail(field, msg):
      raise ConfigError(f"model.{field}={getattr(self, field)!r}: {msg}")

    def choice(field, options):
      if getattr(self, field) not in options:
        fail(field, f"unknown value; use one of {', '.join(options)}")

    for field in ("vocab_size", "d_model", "num_heads", "mlp_dim", "n_middle_layers", "num_cycles",
                  "max_seq_len", "min_cycles"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        fail(field, "must be a positive integer")
    for field in ("n_head_layers", "n_tail_layers", "attention_block_size"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        fail(field, "must be an integer >= 0")
    w = self.attention_window
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
      fail("attention_window", "must be an integer >= 1 (keys per query, its own included) or none (full "
           "causal attention); e.g. --config.model.attention_window=4")
    if self.variant not in VARIANT_PRESETS and self.variant not in VARIANT_ALIASES:
      fail("variant", f"unknown variant; use one of {', '.join([*VARIANT_PRESETS, *VARIANT_ALIASES])}")
    if self.d_model % self.num_heads:
      fail("d_model", f"must be divisible by num_heads={self.num_heads}; change d_model or num_heads")
    g = self.num_kv_heads
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 0 or (g and self.num_heads % g)):
      fail("num_kv_heads", f"must divide num_heads={self.num_heads} (or be none/0: one per query head)")
    if self.position == "rope" and self.head_dim % 2:
      fail("num_heads", f"rope needs an even head_dim, got d_model/num_heads={self.head_dim}")
    choice("norm", NORMS)
    choice("position", POSITIONS)
    choice("mlp", MLPS)
    choice("remat_policy", REMAT_POLICIES)
    choice("exit_granularity", EXIT_GRANULARITIES)
    choice("frozen_kv", FROZEN_KV)
    choice("zero_token_layers", ZERO_TOKEN_LAYERS)
    choice("zero_key_init", ZERO_KEY_INITS)
    choice("dtype", DTYPES)
    choice("attention_impl", ATTENTION_IMPLS)
    choice("exit_signal", EXIT_SIGNALS)
    choice("cycle_readout", CYCLE_READOUTS)
    choice("input_injection", INPUT_INJECTIONS)
    choice("param_dtype", DTYPES)
    for field in ("zero_token", "share_head_tail"):
      if getattr(self, field) not in (None, True, False):
        fail(field, "must be None (take the variant preset), True or False")
    if self.min_cycles > self.cycles:
      fail("min_cycles", f"must be <= the cycles run ({self.cycles}); lower min_cycles or raise num_cycles")
    if not self.norm_eps > 0:
      fail("norm_eps", "must be > 0")
    if not self.rope_theta > 0:
      fail("rope_theta", "must be > 0")
    if not self.zero_key_init_std >= 0:
      fail("zero_key_init_std", "must be >= 0")
    if not self.cycle_loss_weight >= 0:
      fail("cycle_loss_weight", "must be >= 0 (0 turns deep supervision off)")
    if self.exit_threshold is not None:
      if isinstance(self.exit_threshold, bool) or not isinstance(self.exit_threshold, (int, float)):
        fail("exit_threshold", "must be a number in [0, 1], or none (no exit)")
      # tau is compared with a mean attention weight, which lies in [0, 1]: below 0 every token exits
      # after min_cycles, above 1 none ever does; both are typos rather than choices.
      if not 0.0 <= self.exit_threshold <= 1.0:
        fail("exit_threshold", "must lie in [0, 1] (a zero-attention mass), or be none for no exit; "
             "e.g. --config.model.exit_threshold=0.5")
      # The threshold is the default of evaluation and generation, whose zero-attention exit needs
      # the zero token; without one the first evaluation would fail after training had begun.
      if self.exit_signal in ZERO_ATTENTION_SIGNALS and not self.use_zero_token:
        fail("exit_threshold", f"variant={self.variant!r} has no zero token, so there is no zero-attention "
             "exit signal; pass --config.model.exit_threshold=none (or use variant=ztt, or "
             "zero_token=True)")
    # After the exit checks: a variant without the zero token names the exit first, the one a user
    # switching variants most likely has to turn off.
    self._validate_recipes(fail)
    return self

  def _validate_recipes(self, fail) -> None:
    """The looped-training recipe fields (backprop_cycles, input_injection, exit_gate, zero_bias_init,
    zero_attention_target_weight)."""
    r = self.cycle_lora_rank
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
      fail("cycle_lora_rank", "must be an integer >= 0 (0: no per-cycle LoRA)")
    if r and not VARIANT_PRESETS[self.canonical_variant]["cycled"]:
      fail("cycle_lora_rank", f"variant={self.variant!r} has no cycled stack; set it to 0 or use variant=ztt")
    e = self.cycle_loss_every
    if not isinstance(e, int) or isinstance(e, bool) or e < 1:
      fail("cycle_loss_every", "must be a positive integer (1: every cycle is read out)")
    if e > 1 and self.exit_gate:
      fail("cycle_loss_every", "the exit gate's expected loss needs every cycle's loss; set it to 1 or "
           "turn exit_gate off")
    k = self.backprop_cycles
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
      fail("backprop_cycles", "must be an integer >= 0 (the last k cycles get gradients; 0: all of them)")
    if self.zero_bias_init != 0 and not self.zero_bias:
      fail("zero_bias_init", "has no effect without the zero-slot bias; add --config.model.zero_bias=True")
    for field in ("exit_gate_loss_weight", "exit_gate_kl_weight"):
      if not getattr(self, field) >= 0:
        fail(field, "must be >= 0")
    if self.exit_gate not in (True, False):
      fail("exit_gate", "must be True or False")
    if self.exit_signal == "gate" and not self.exit_gate:
      fail("exit_signal", "the gate signal needs the learned gate; add --config.model.exit_gate=True")
    if not self.zero_attention_target_weight >= 0:
      fail("zero_attention_target_weight", "must be >= 0 (0 turns the a0 target loss off)")
    if not 0 <= self.zero_attention_target_smoothing < 0.5:
      fail("zero_attention_target_smoothing", "must be in [0, 0.5): the labels are s and 1 - s")
    if self.zero_attention_target_weight > 0 and not self.use_zero_token:
      fail("zero_attention_target_weight", f"variant={self.variant!r} has no zero token to train; set it to 0 "
           "or use variant=ztt")
