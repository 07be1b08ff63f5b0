"""Train a ZTT: `python -m ztt_jax.train --config=configs/default.py --workdir=DIR [--config.a.b=v]`.

Re-running the same command resumes from the newest checkpoint in DIR.
"""
import logging
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def main(argv):
  del argv
  # Our own progress at INFO; Orbax, Grain and JAX (which log through absl) only when it matters.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("ztt_jax").setLevel(logging.INFO)
  from ztt_jax import distributed
  try:
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  import jax
  if jax.process_index() != 0:
    # One log per run: other processes report only warnings and errors (metrics are process 0's too).
    logging.getLogger("ztt_jax").setLevel(logging.WARNING)
  from ztt_jax import config as config_lib, errors, trainer  # after jax.distributed, which comes first
  try:
    cfg = config_lib.parse(_CONFIG.value)
    trainer.train(cfg, _WORKDIR.value)
  except (errors.ConfigError, errors.DataError, errors.CheckpointError) as e:
    _fail_fast_if_multiprocess(f"{type(e).__name__}: {e}")
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  except trainer.NonFiniteLossError as e:
    _fail_fast_if_multiprocess(f"NonFiniteLossError: {e}")
    raise SystemExit(f"NonFiniteLossError: {e}") from None  # exit status 1, no traceback
  except Exception:  # noqa: BLE001 - anything else: report it, then fail fast
    _fail_fast_if_multiprocess(traceback.format_exc())
    raise


def _fail_fast_if_multiprocess(message: str):
  """With several processes, jax.distributed's exit handler waits minutes for the others, which
  may be blocked in a collective waiting for this one. Report and leave at once instead; the
  launcher (multiprocess.sh, srun --kill-on-bad-exit) then stops the rest."""
  import jax
  if jax.process_count() > 1:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
  app.run(main)
