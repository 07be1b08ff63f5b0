"""Train a ZTT: `python -m ztt_jax.train --config=configs/default.py --workdir=DIR [--config.a.b=v]`.

Re-running the same command resumes from the newest checkpoint in DIR.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", None, "Seconds without a heartbeat after which a "
                                  "process counts as lost and the others exit (multi-host; default 30).",
                                  lower_bound=1)


def main(argv):
  del argv
  from ztt_jax import distributed
  try:
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  import jax
  if jax.process_index() != 0:
    # One log per run: other processes report only warnings and errors (metrics are process 0's too).
    logging.getLogger("ztt_jax").setLevel(logging.WARNING)
  from ztt_jax import config as config_lib, trainer  # after jax.distributed, which comes first
  cfg = config_lib.parse(_CONFIG.value)
  try:
    trainer.train(cfg, _WORKDIR.value)
  except trainer.NonFiniteLossError as e:
    _fail_fast_if_multiprocess(f"NonFiniteLossError: {e}")
    raise SystemExit(f"NonFiniteLossError: {e}") from None  # exit status 1, no traceback
  except Exception as e:  # noqa: BLE001 - a peer that died surfaces here as a failed collective
    lost = distributed.peer_lost(e, _HEARTBEAT.value)
    if lost:
      _fail_fast_if_multiprocess(lost, distributed.EXIT_PEER_LOST)
    raise


def _fail_fast_if_multiprocess(message: str, code: int = 1):
  """With several processes, jax.distributed's exit handler waits minutes for the others, which
  may be blocked in a collective waiting for this one. Report and leave at once instead; the
  launcher (multiprocess.sh, srun --kill-on-bad-exit) then stops the rest."""
  if "jax" not in sys.modules:  # failed before jax.distributed: nothing waits on this process
    return
  import jax
  if jax.process_count() > 1:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
  from ztt_jax import cli  # one-line errors (exit 2: config, 1: other), --verbose, quiet libraries
  cli.run(main, on_error=_fail_fast_if_multiprocess)
