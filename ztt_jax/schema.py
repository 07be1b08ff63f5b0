"""Dict -> frozen dataclass: the one parser behind every config section and the whole `Config`.

It imports nothing of ztt_jax but the errors, so `model/` and `data/` can use it without reaching
the top-level `ztt_jax.config` (which imports them).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping

from ztt_jax.errors import ConfigError


def from_any(cls, value: Any, section: str = ""):
  """A validated `cls` from a `cls`, a dict or an ml_collections (Frozen)ConfigDict.

  Fields whose type is itself a dataclass are parsed the same way, named `section.field` in errors.
  The values ml_collections and JSON hand back are brought to the field's type: lists to tuples
  (JSON has no tuple), ints to floats (a float field overridden with `=1`).
  """
  if isinstance(value, cls):
    return _validated(value, section)
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError(f"{section or 'config'} must be a {cls.__name__}, dict or ConfigDict, got "
                      f"{type(value).__name__}; pass one of those.")
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in value if k not in names]
  prefix = f"{section}." if section else ""
  if unknown:
    raise ConfigError(f"Unknown field {', '.join(prefix + k for k in unknown)}. "
                      f"Valid fields: {', '.join(names)}.")
  hints = typing.get_type_hints(cls)
  return _validated(cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in value.items()}), section)


def _validated(obj, section: str = ""):
  check_finite(obj, section)
  if hasattr(obj, "validate"):
    obj.validate()
  return obj


def check_finite(obj, section: str = ""):
  """ConfigError for the first NaN or infinite float in `obj`'s fields (nested sections and tuples
  too). It runs before `validate`: a NaN slips through comparisons such as `lr <= 0`, and would
  otherwise be found only as a non-finite loss after compiling and training."""
  prefix = f"{section}." if section else ""
  for f in dataclasses.fields(obj):
    value, name = getattr(obj, f.name), prefix + f.name
    if dataclasses.is_dataclass(value):
      check_finite(value, name)
    elif not _all_finite(value):
      raise ConfigError(f"{name}={value}: must be a finite number, not nan or inf; set "
                        f"--config.{name} to a finite value.")


def _all_finite(x) -> bool:
  if isinstance(x, (list, tuple)):
    return all(_all_finite(v) for v in x)
  return not isinstance(x, float) or math.isfinite(x)


def _coerce(value, hint, name: str):
  if isinstance(hint, type) and dataclasses.is_dataclass(hint):
    return from_any(hint, value, name)
  types = typing.get_args(hint) or (hint,)
  if isinstance(value, list) and tuple in types:
    return _deep_tuple(value)
  if float in types and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _deep_tuple(x):
  return tuple(_deep_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
