"""User-facing errors. Each message names what was wrong and how to fix it."""


class ConfigError(ValueError):
  """A config value is invalid; raised before anything is compiled."""


class DataError(ValueError):
  """A data file or directory cannot be used as configured."""


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored."""


class OutputError(ConfigError):
  """An output path would overwrite or delete something ztt_jax did not write (or its own input)."""


class LeaseError(ConfigError):
  """Another live run holds the work directory's lease (ztt_jax/lease.py), or took it over."""
