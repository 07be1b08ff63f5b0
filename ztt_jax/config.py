"""The experiment schema: one frozen dataclass per config section.

The dataclasses are the single source of truth. `base_config()` turns their defaults into the
ml_collections `ConfigDict` that config files start from and `--config.a.b=v` flags override;
`parse()` turns a (possibly overridden) `ConfigDict` back into dataclasses and validates it, before
anything is compiled. Field comments are the reference documentation.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from ztt_jax import schema
from ztt_jax.data.config import DataConfig
from ztt_jax.errors import ConfigError
from ztt_jax.model.config import ModelConfig
from ztt_jax.partitioning import MESH_AXES

# FSDP shards params over `fsdp`, tensor parallelism splits heads/mlp/vocab over `tensor`, and the
# batch is split over both data-parallel axes. Flax assigns a mesh axis at most once per array, so
# activations constrained to (batch, length, embed) keep `embed` unsharded.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
    ("cycles", None),
    ("length", None),
)


CYCLES_DISTRIBUTIONS = ("none", "poisson", "lognormal_poisson")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300
  """Number of optimizer steps."""
  global_batch_size: int = 32
  """Sequences per optimizer step, summed over all processes and microbatches."""
  microbatches: int = 1
  """Gradient accumulation: the global batch is split into this many sequential microbatches."""
  seed: int = 0
  """Seeds parameter init and (with `data.seed`) nothing else: data order has its own seed."""
  learning_rate: float = 3e-3
  """Peak learning rate of the warmup + cosine schedule."""
  warmup_steps: int = 30
  """Linear warmup from 0 to `learning_rate`."""
  min_lr_ratio: float = 0.1
  """The cosine decays to `learning_rate * min_lr_ratio` at `steps`."""
  weight_decay: float = 0.1
  """AdamW decoupled weight decay; never applied to norms, biases or the zero-key pool."""
  b1: float = 0.9
  b2: float = 0.95
  grad_clip_norm: float = 1.0
  """Global-norm gradient clipping; 0 disables it."""
  nonfinite: str = "raise"
  """On a non-finite loss or gradient: `raise` stops naming the step (the bad update is never
  applied, so no non-finite params are saved); `skip` drops the update and counts
  `train/skipped_steps`."""
  peak_flops_per_device: Optional[float] = None
  """Peak FLOP/s of one device for MFU. None: measured float32 matmul peak on CPU, table value for
  known accelerators."""
  cycles_distribution: str = "none"
  """Random cycle count per step (Huginn): none (always model.num_cycles) | poisson
  (C = 1 + Poisson(cycles_mean - 1)) | lognormal_poisson (C = 1 + Poisson(r), r = (cycles_mean - 1)
  exp(cycles_sigma z - cycles_sigma^2 / 2), z ~ N(0, 1): Huginn's heavier-tailed draw), clipped to
  [1, cycles_max]. Drawn on the host from numpy's Generator seeded with (train.seed, step), so a
  resumed run draws the same sequence; each count is its own compiled step (at most cycles_max).
  Pool row c serves cycle c; rows past the drawn count go unused that step. Evaluation runs
  model.num_cycles. Logged as train/num_cycles."""
  cycles_mean: Optional[float] = None
  """Mean cycle count before clipping; None: (1 + cycles_max) / 2."""
  cycles_max: Optional[int] = None
  """Largest cycle count drawn; None: model.num_cycles (the pool's rows). More reuses the last row."""
  cycles_sigma: float = 0.5
  """Log-normal spread of lognormal_poisson (Huginn: 0.5)."""
  loss_block_tokens: int = 0
  """Tokens per block of the loss (ztt_jax/loss.py: the LM head and log-softmax run block by block
  over the sequence, so the [B, T, V] logits are never held; training and evaluation alike). Counted
  over the whole (micro)batch; a block's float32 logits take block x vocab_size x 4 bytes, split over
  the devices. 0: automatic, about 2^25 logits (128 MiB) per block."""

  def validate(self):
    if self.steps < 1:
      raise ConfigError(f"train.steps={self.steps}: set it to at least 1.")
    if self.global_batch_size < 1:
      raise ConfigError(f"train.global_batch_size={self.global_batch_size}: must be positive.")
    if self.microbatches < 1 or self.global_batch_size % self.microbatches:
      raise ConfigError(
          f"train.global_batch_size={self.global_batch_size} is not divisible by "
          f"train.microbatches={self.microbatches}; pick a divisor of the batch.")
    if self.nonfinite not in ("raise", "skip"):
      raise ConfigError(f"train.nonfinite={self.nonfinite!r}: use 'raise' or 'skip'.")
    if self.learning_rate <= 0:
      raise ConfigError(f"train.learning_rate={self.learning_rate}: must be positive.")
    if self.cycles_distribution not in CYCLES_DISTRIBUTIONS:
      raise ConfigError(f"train.cycles_distribution={self.cycles_distribution!r}: use one of "
                        f"{', '.join(CYCLES_DISTRIBUTIONS)}.")
    if isinstance(self.loss_block_tokens, bool) or self.loss_block_tokens < 0:
      raise ConfigError(f"train.loss_block_tokens={self.loss_block_tokens}: must be >= 0 (0: automatic).")
    if self.cycles_max is not None and (isinstance(self.cycles_max, bool) or self.cycles_max < 1):
      raise ConfigError(f"train.cycles_max={self.cycles_max}: must be a positive integer, or none.")
    if self.cycles_mean is not None and not self.cycles_mean >= 1:
      raise ConfigError(f"train.cycles_mean={self.cycles_mean}: must be >= 1, or none.")
    if not self.cycles_sigma >= 0:
      raise ConfigError(f"train.cycles_sigma={self.cycles_sigma}: must be >= 0.")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: tuple = (-1, 1, 1)
  """Device mesh over the axes (data, fsdp, tensor). One entry may be -1: the rest of the devices."""
  logical_axis_rules: tuple = DEFAULT_LOGICAL_AXIS_RULES
  """(logical axis, mesh axes) pairs mapping the model's logical names to mesh axes."""

  def validate(self):
    if len(self.shape) != len(MESH_AXES):
      raise ConfigError(
          f"mesh.shape={self.shape} must have {len(MESH_AXES)} entries for the axes {MESH_AXES}, "
          "e.g. --config.mesh.shape='(-1,1,1)'.")
    if sum(1 for s in self.shape if s == -1) > 1:
      raise ConfigError(f"mesh.shape={self.shape}: at most one entry may be -1.")
    if any(s == 0 or s < -1 for s in self.shape):
      raise ConfigError(f"mesh.shape={self.shape}: entries must be positive, or -1 for the rest.")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  """Save every this many steps, and always at the end."""
  max_to_keep: int = 3
  """Older checkpoints are deleted once this many exist."""
  async_save: bool = True
  """Write checkpoints in a background thread while training continues."""
  allow_fresh_start: bool = False
  """If checkpoints exist but none can be restored, start from scratch instead of stopping."""
  allow_config_change: bool = False
  """Resume even though the config changed in a way that makes the checkpoint mean something else
  (model shapes or layout, data source or order, seeds; see ztt_jax/resume.py). Without it such a
  resume stops before compiling and lists each changed field; safe changes (steps, learning rate,
  cadences, exit threshold) are always allowed and logged."""
  lease_timeout_s: float = 900.0
  """A run holds WORKDIR/lease.json (ztt_jax/lease.py) so that a second run on the same directory
  stops instead of writing beside it. Its lease is refreshed every few seconds while it trains; one
  not refreshed for this long is taken over (so is one whose pid is gone on the same host, at once).
  Keep it above the longest pause between two steps: the first compile, an evaluation, a blocking
  save."""
  replica_parallel_min_bytes: int = 1 << 20
  """A replicated array is written in parallel by its replicas (Orbax's replica-parallel save, each
  writing a slice) only where each slice is at least this many bytes. Below it one replica writes the
  whole array: cutting a small array costs a compiled slice program per shape, more than the write it
  splits (the tiny test models had 1,440 of them per run). 0: always split."""

  def validate(self):
    if self.every_steps < 1 or self.max_to_keep < 1:
      raise ConfigError("checkpoint.every_steps and checkpoint.max_to_keep must be at least 1.")
    if not self.lease_timeout_s > 0:
      raise ConfigError(f"checkpoint.lease_timeout_s={self.lease_timeout_s}: must be positive (seconds).")
    if isinstance(self.replica_parallel_min_bytes, bool) or self.replica_parallel_min_bytes < 0:
      raise ConfigError(f"checkpoint.replica_parallel_min_bytes={self.replica_parallel_min_bytes}: "
                        "must be >= 0 bytes (0: always split).")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int = 10
  """Print a progress line and write metrics.jsonl / TensorBoard every this many steps."""
  tensorboard: bool = True
  """Also write TensorBoard event files under WORKDIR/tensorboard."""

  def validate(self):
    if self.every_steps < 1:
      raise ConfigError(f"log.every_steps={self.every_steps}: must be at least 1.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 100
  """Evaluate on held-out data every this many steps, and at the end."""
  max_batches: int = 8
  """Upper bound on eval batches per evaluation (text data can have many windows); 0 turns
  evaluation off (nothing is compiled for it)."""
  batch_size: Optional[int] = None
  """Global eval batch size; None uses train.global_batch_size."""

  def validate(self):
    if self.every_steps < 1 or self.max_batches < 0:
      raise ConfigError("eval.every_steps must be at least 1 and eval.max_batches at least 0 (0: no eval).")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  eval: EvalConfig = EvalConfig()
  init_from: Optional[str] = None
  """Directory of an exported params-only checkpoint (e.g. a converted GPT-2) to start from."""

  def validate(self):
    schema.check_finite(self)  # also for a Config built in Python, which `parse` never saw
    for f in dataclasses.fields(self):
      section = getattr(self, f.name)
      if hasattr(section, "validate"):
        section.validate()
    if self.train.cycles_distribution != "none" and self.model.canonical_variant == "vanilla":
      raise ConfigError(
          f"train.cycles_distribution={self.train.cycles_distribution!r} draws a cycle count, but "
          "model.variant='vanilla' runs one pass; use a cycled variant or "
          "--config.train.cycles_distribution=none.")
    if self.data.kind == "propagation" and self.model.attention_window != self.data.window:
      raise ConfigError(
          f"data.window={self.data.window} but model.attention_window={self.model.attention_window}: the "
          "propagation task measures difficulty in the model's window; set both to the same value.")
    if self.data.seq_len > self.model.max_seq_len:
      raise ConfigError(
          f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len} "
          "(the position limit); lower data.seq_len or raise model.max_seq_len.")
    return self


# ml_collections picks the parser of a `--config.a.b=v` flag by the field's type, and its float, int
# and bool parsers reject "none", so an Optional field could never be turned off from the command
# line. An Optional field's type is therefore a tuple of types: ConfigDict type-checks values with
# isinstance, which takes a tuple, and each tuple has a parser that reads none, None and an empty
# value as None. (float takes int values too, as ml_collections' own float fields do.)
_OPTIONAL_FIELD_TYPES = {float: (float, int), int: (int,), bool: (bool,), str: (str,)}
_NONE_WORDS = ("none", "")


class _NoneOrParser(flags.ArgumentParser):
  def __init__(self, inner: flags.ArgumentParser):
    self._inner = inner

  def parse(self, argument):
    if argument is None or (isinstance(argument, str) and argument.strip().lower() in _NONE_WORDS):
      return None
    return self._inner.parse(argument)

  def flag_type(self):
    return f"{self._inner.flag_type()} or none"


for _inner, _parser in ((float, flags.FloatParser()), (int, flags.IntegerParser()),
                        (bool, flags.BooleanParser()), (str, flags.ArgumentParser())):
  config_flags.register_flag_parser_for_type(_OPTIONAL_FIELD_TYPES[_inner], _NoneOrParser(_parser))


def _config_field(value, tp):
  """A ConfigDict entry for a dataclass field of type `tp` holding `value`."""
  inner = [a for a in typing.get_args(tp) if a is not type(None)]
  if len(inner) == len(typing.get_args(tp)) or len(inner) != 1:
    return value  # not Optional[T]
  field_type = _OPTIONAL_FIELD_TYPES.get(inner[0], inner[0])
  return config_dict.FieldReference(value, field_type=field_type)


def _section_to_configdict(section) -> ml_collections.ConfigDict:
  cd = ml_collections.ConfigDict()
  hints = typing.get_type_hints(type(section))
  for f in dataclasses.fields(section):
    cd[f.name] = _config_field(getattr(section, f.name), hints[f.name])
  return cd


def preset(presets: dict, name, default: str, config_file: str) -> dict:
  """The overrides of preset `name` (the part after ':' in --config=FILE:NAME; empty: `default`) of a
  config file's PRESETS, or one ValueError naming the choices."""
  name = name or default
  if name not in presets:
    other = next((p for p in sorted(presets) if p != default), default)
    raise ValueError(f"Unknown preset {name!r} for {config_file}; choose one of {sorted(presets)}, "
                     f"e.g. --config={config_file}:{other}")
  return presets[name]


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults; config files start here and change what they need."""
  cfg = ml_collections.ConfigDict()
  default = Config()
  hints = typing.get_type_hints(Config)
  for f in dataclasses.fields(Config):
    value = getattr(default, f.name)
    if dataclasses.is_dataclass(value):
      cfg[f.name] = _section_to_configdict(value)
    else:
      cfg[f.name] = _config_field(value, hints[f.name])
  return cfg


def parse(cfg: Any) -> Config:
  """ConfigDict (or dict or Config) -> validated `Config`; raises ConfigError naming the fix."""
  return schema.from_any(Config, cfg)


def to_dict(cfg: Config) -> dict:
  """JSON-ready dict, stored in every checkpoint's metadata."""
  return dataclasses.asdict(cfg)
