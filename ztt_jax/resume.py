"""Resume checks: the config saved in a checkpoint against the config of the run resuming it.

Re-running a command resumes from its work directory. If the config changed in between, the
checkpoint may no longer be the run the user thinks it is. Each changed field is one of:

- fatal: the checkpoint would mean something else. The model's shapes and layout (widths, layer
  counts, cycles, variant, zero token, norm/position/MLP form, ...), and the data's source and
  order (kind, path, tokenizer, seq_len, seed, the task's shape), and the init seed (a seed sweep
  pointed at one work directory would silently continue the first seed). The resume stops before
  anything is compiled with a ConfigError listing each `section.field: old -> new` and the fixes:
  a new --workdir, the old values, or --config.checkpoint.allow_config_change=True.
- safe: what may change mid-run (steps, learning-rate schedule, optimizer constants, cadences,
  exit threshold and other evaluation-time settings, mesh, logging). Logged, old -> new.

A fatal field whose value does not matter under either config (e.g. data.path for the built-in
multi-hop task, model.rope_theta with learned positions) counts as safe. Fields absent from an
older checkpoint's config compare as their default; fields the code no longer has are ignored.
The mesh is never fatal: restoring reshards. `train.global_batch_size` is safe with a warning (the
trainer's): the data iterator counts global batches, so the resumed run skips or repeats some
examples once (README, "Data order across process counts").

The data path's contents are checked too (`check_data`): a corpus that lost a file or a token file
rewritten in place changes the run as much as a new path would (ztt_jax/data/fingerprint.py).

This module is pure: it reads dicts and returns/raises; `check` and `check_data` are what the
trainer calls.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Optional

from ztt_jax import config as config_lib
from ztt_jax.data import fingerprint as fingerprint_lib
from ztt_jax.data.config import SYNTHETIC_KINDS
from ztt_jax.errors import ConfigError

log = logging.getLogger(__name__)

_WINDOW_KINDS = ("text", "tokens", "array_record")


def _model_pos(pos):
  return lambda cfgs: any(c.get("model", {}).get("position") == pos for c in cfgs)


def _data_kind(*kinds):
  return lambda cfgs: any(c.get("data", {}).get("kind") in kinds for c in cfgs)


def _always(cfgs):
  return True


# section -> field -> when the field matters (fatal if changed then). Fields not listed are safe.
FATAL: dict[str, dict[str, Callable]] = {
    "model": {
        **{f: _always for f in (
            "vocab_size", "d_model", "num_heads", "mlp_dim", "n_head_layers", "n_middle_layers",
            "n_tail_layers", "num_cycles", "variant", "zero_token", "share_head_tail", "zero_token_layers",
            "zero_bias", "norm", "norm_eps", "position", "mlp", "use_bias", "tie_embeddings", "param_dtype",
            "input_injection", "exit_gate", "num_kv_heads", "cycle_lora_rank")},
        "max_seq_len": _model_pos("learned"),  # sizes the position table; with rope only a limit
        "rope_theta": _model_pos("rope"),
    },
    "data": {
        "kind": _always, "seq_len": _always, "seed": _always,
        "path": _data_kind(*_WINDOW_KINDS), "eval_fraction": _data_kind(*_WINDOW_KINDS),
        "tokenizer": _data_kind("text"), "token_dtype": _data_kind("tokens"),
        "max_hops": _data_kind("multihop"), "num_queries": _data_kind("multihop"),
        "num_distractors": _data_kind("multihop"), "order": _data_kind("multihop"),
        "label_statements": _data_kind("multihop"), "curriculum_examples": _data_kind(*SYNTHETIC_KINDS),
        "window": _data_kind("propagation"), "max_difficulty": _data_kind("propagation"),
    },
    "train": {"seed": _always},
}
# Compared as paths: 'corpus.txt' and './corpus.txt' are the same file.
_PATH_FIELDS = {("data", "path"), ("data", "tokenizer")}
# Safe, but the user should know the consequence.
_WARN = {("train", "global_batch_size"): "the data iterator counts global batches, so the resumed run skips "
                                         "or repeats some examples once"}
# The switch that allows the change is not itself a change of the run.
_NOT_COMPARED = {("checkpoint", "allow_config_change")}
# Changing these does nothing once a checkpoint exists.
_IGNORED = {("", "init_from"): "ignored: the run resumes from its checkpoint, not from init_from"}


@dataclasses.dataclass(frozen=True)
class Change:
  section: str
  field: str
  old: Any
  new: Any
  fatal: bool
  note: str = ""

  @property
  def name(self) -> str:
    return f"{self.section}.{self.field}" if self.section else self.field

  def __str__(self) -> str:
    return f"{self.name}: {_show(self.old)} → {_show(self.new)}" + (f" ({self.note})" if self.note else "")


def _show(v) -> str:
  return "none" if v is None else repr(v) if isinstance(v, str) else json.dumps(v)


def _plain(x):
  """JSON-comparable form: tuples are lists, as they come back from a checkpoint's metadata."""
  return json.loads(json.dumps(x, default=str))


def _defaults() -> dict:
  return _plain(config_lib.to_dict(config_lib.Config()))


def compare(saved: dict, new: dict, defaults: Optional[dict] = None) -> list[Change]:
  """Every field that differs between two config dicts (`config.to_dict` form), classified."""
  saved, new = _plain(saved), _plain(new)
  defaults = _defaults() if defaults is None else _plain(defaults)
  changes = []
  order = {name: i for i, name in enumerate(defaults)}  # the Config's own order: model, data, train, ...
  for section in sorted(set(saved) | set(new) | set(defaults), key=lambda s: (order.get(s, len(order)), s)):
    s_val, n_val = saved.get(section), new.get(section)
    d_val = defaults.get(section)
    if isinstance(s_val, dict) or isinstance(n_val, dict) or isinstance(d_val, dict):
      s_val, n_val, d_val = s_val or {}, n_val or {}, d_val or {}
      # The new config's fields: one the code no longer has means nothing now, and one added since
      # the checkpoint compares as its default (what the old code did without it).
      for field in sorted(n_val):
        if (section, field) in _NOT_COMPARED:
          continue
        old, cur = s_val.get(field, d_val.get(field)), n_val[field]
        if _same(section, field, old, cur):
          continue
        rule = FATAL.get(section, {}).get(field)
        fatal = rule is not None and rule([saved, new])
        changes.append(Change(section, field, old, cur, fatal, _WARN.get((section, field), "")))
    elif section in new and not _same("", section, s_val if section in saved else d_val, n_val):
      changes.append(Change("", section, s_val, n_val, False, _IGNORED.get(("", section), "")))
  return changes


def _same(section, field, a, b) -> bool:
  if (section, field) in _PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
    return os.path.normpath(a) == os.path.normpath(b)
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
      and not isinstance(b, bool):
    return float(a) == float(b)
  return a == b


def check(saved_config: Optional[dict], new_cfg, *, workdir: str, step: int) -> list[Change]:
  """Compares the checkpoint's saved config with the resuming run's `new_cfg` (a Config).

  Raises ConfigError naming every fatal change, unless checkpoint.allow_config_change; logs the
  rest (old -> new). Returns all changes. `saved_config=None` (a checkpoint without one) checks nothing.
  """
  if not saved_config:
    log.warning("Checkpoint step %d in %s has no saved config; cannot check what changed since it.",
                step, workdir)
    return []
  changes = compare(saved_config, config_lib.to_dict(new_cfg))
  fatal = [c for c in changes if c.fatal]
  if fatal and not new_cfg.checkpoint.allow_config_change:
    raise ConfigError(
        f"--workdir={workdir} holds a run (checkpoint step {step}) whose config differs from this one in "
        f"what the checkpoint means: {'; '.join(map(str, fatal))}. Use a new --workdir for a new run, "
        "pass the old values to resume this one, or pass --config.checkpoint.allow_config_change=True "
        "to resume it anyway with the new values.")
  for c in changes:
    if c.fatal:
      log.warning("Resuming with a changed %s (checkpoint.allow_config_change=True).", c)
    else:  # train.global_batch_size's consequence is spelled out, with numbers, by the trainer
      log.info("Resuming with a changed %s.", c)
  return changes


def check_data(saved_fingerprint: Optional[dict], new_fingerprint: Optional[dict], new_cfg, *, workdir: str,
               step: int) -> None:
  """Compares what data.path held when checkpoint `step` was saved with what it holds now.

  Raises ConfigError listing every change that makes it different data (files gone or new, sizes,
  token or record counts), unless checkpoint.allow_config_change; an mtime-only change is logged.
  A checkpoint from before fingerprints, or an embedded task, checks nothing."""
  if not saved_fingerprint or not new_fingerprint:
    return
  fatal, maybe = fingerprint_lib.differences(saved_fingerprint, new_fingerprint)
  for m in maybe:
    log.warning("data.path %s: %s since checkpoint step %d; resuming on it.", new_cfg.data.path, m, step)
  if not fatal:
    return
  if not new_cfg.checkpoint.allow_config_change:
    raise ConfigError(
        f"--workdir={workdir} holds a run (checkpoint step {step}) trained on different data than "
        f"data.path={new_cfg.data.path!r} holds now: {'; '.join(fatal)}. Restore the data, use a new --workdir "
        "for a new run, or pass --config.checkpoint.allow_config_change=True to resume on the new data.")
  log.warning("Resuming on changed data (checkpoint.allow_config_change=True): %s.", "; ".join(fatal))
