"""User-facing errors. Each message names what was wrong and how to fix it."""
import errno


class ConfigError(ValueError):
  """A config value is invalid; raised before anything is compiled."""


class DataError(ValueError):
  """A data file or directory cannot be used as configured."""


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored."""


class DiskFullError(RuntimeError):
  """A write ran out of space; what was there before (the last checkpoint, the old export) is kept."""


def is_disk_full(e: BaseException) -> bool:
  """An out-of-space failure, from Python's file layer or from one that only keeps the text
  (tensorstore under Orbax raises ValueError('RESOURCE_EXHAUSTED: ... [os_error_code='28']'))."""
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(e)
  return any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                 f"os_error_code='{errno.ENOSPC}'", f"os_error_code='{errno.EDQUOT}'"))


class OutputError(ConfigError):
  """An output path would overwrite or delete something ztt_jax did not write (or its own input)."""


class LeaseError(ConfigError):
  """Another live run holds the work directory's lease (ztt_jax/lease.py), or took it over."""
