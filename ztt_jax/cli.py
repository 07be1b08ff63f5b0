"""Runs a command-line tool's absl `main` so that a mistake costs one line, not a traceback.

`cli.run(main)` replaces `absl.app.run(main)` in every tool. It:

- catches the project's errors (ztt_jax.errors), absl's UsageError and the usual OS errors about a
  path (missing, not a directory, is a directory, permission), and prints ONE line to stderr that
  names the problem and the fix;
- does the same for errors while parsing the flags, e.g. an unknown `--config.train.stepz` (which
  ml_collections reports as a 55-line KeyError chain) or a config file that is missing or broken,
  without absl's `--help` dump;
- exits 2 for bad arguments or config (ConfigError, DataError, UsageError, flag errors) and 1 for
  everything else it catches (checkpoint and OS errors); other exceptions are bugs and keep their
  traceback;
- keeps library chatter (Orbax, Grain, JAX and absl INFO lines) below the output, while the
  project's own progress (the `ztt_jax` logger) stays at INFO;
- adds `--verbose`: INFO logging from every library, and the traceback of a caught error.

The tools that load a trained run and pick its exit rule (evaluate, generate) share their flags
and that opening: `define_trained_run_flags`, `load_trained_run`.
"""
from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Callable, Optional

from ztt_jax import errors

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command

# OS errors that name a path the user gave (or that follows from one).
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _verbose_flag():
  from absl import flags
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show library INFO logs, and the traceback of an error.")
  return flags.FLAGS["verbose"]


def run(main: Callable, *, on_error: Optional[Callable[[str, int], None]] = None) -> None:
  """absl.app.run(main) with one-line errors (see the module docstring).

  on_error(text, exit_code): called before exiting with the error line, or the traceback of an
  error this module does not describe (train uses it to fail fast when several processes would
  otherwise wait on this one).
  """
  from absl import app
  _verbose_flag()
  app.run(_wrap(main, on_error), flags_parser=_parse_flags)


def verbose() -> bool:
  from absl import flags
  return bool(flags.FLAGS["verbose"].value) if "verbose" in flags.FLAGS else False


def quiet_libraries(verbose_: bool) -> None:
  """Library INFO chatter (e.g. Orbax's "Closing _NonBlockingMetadataStore(...)") stays hidden;
  ztt_jax's own progress lines stay at INFO."""
  from absl import logging as absl_logging
  level = logging.INFO if verbose_ else logging.WARNING
  absl_logging.set_verbosity(absl_logging.INFO if verbose_ else absl_logging.WARNING)
  logging.getLogger().setLevel(level)
  logging.getLogger("ztt_jax").setLevel(logging.INFO)


def fail(line: str, code: int, on_error: Optional[Callable[[str, int], None]] = None):
  if on_error is not None:
    on_error(line, code)
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def describe(e: BaseException) -> tuple[str, int]:
  """(one line naming the problem and fix, exit code) for a caught error."""
  from absl import app
  if isinstance(e, (errors.ConfigError, errors.DataError)):
    return f"{type(e).__name__}: {_one_line(str(e))}", EXIT_USAGE
  if isinstance(e, app.UsageError):
    return f"usage error: {_one_line(str(e))}", EXIT_USAGE
  if isinstance(e, (errors.CheckpointError, errors.DiskFullError)):
    return f"{type(e).__name__}: {_one_line(str(e))}", EXIT_ERROR
  if isinstance(e, PATH_ERRORS):
    return f"{type(e).__name__}: {_os_error_text(e)}", EXIT_ERROR
  raise TypeError(e)


def _os_error_text(e: OSError) -> str:
  what = e.strerror or str(e)
  path = e.filename if e.filename is not None else ""
  fix = {FileNotFoundError: "check the path",
         NotADirectoryError: "a path component is a file; give a directory",
         IsADirectoryError: "give a file, not a directory",
         PermissionError: "check its permissions, or choose a path you can write"}[
             next(c for c in PATH_ERRORS if isinstance(e, c))]
  return f"{what}: {path}; {fix} (--verbose shows the traceback)." if path else f"{what}; {fix}."


def _one_line(text: str) -> str:
  """Our messages are written as one line; a few (lists of failures) have indented detail lines,
  which become '; '-separated so the error stays one line."""
  parts = [p.strip() for p in text.strip().splitlines() if p.strip()]
  return "; ".join(parts)


def _caught(e: BaseException) -> bool:
  from absl import app
  return isinstance(e, (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.DiskFullError,
                        app.UsageError,
                        *PATH_ERRORS))


def _wrap(main: Callable, on_error):
  def wrapped(argv):
    verbose_ = verbose()
    quiet_libraries(verbose_)
    try:
      return main(argv)
    except KeyboardInterrupt:
      # The trainer turns the first Ctrl-C into a clean save; this is the second one, or a tool
      # that has nothing to save.
      if verbose_:
        traceback.print_exc()
      fail("interrupted (Ctrl-C).", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one we describe
      if not _caught(e):
        if on_error is not None:
          on_error(traceback.format_exc(), EXIT_ERROR)
        raise
      if verbose_:
        traceback.print_exc()
      line, code = describe(e)
      fail(line, code, on_error)
  return wrapped


# ------------------------------------------------------------------ flag parsing

def _parse_flags(argv):
  """absl parses flags (and ml_collections loads the --config file and applies its overrides)
  before main runs; its errors come here instead of a traceback plus the --help text."""
  from absl import flags
  try:
    args = flags.FLAGS(argv)
    for name in list(flags.FLAGS):
      # ml_collections defers a config file that fails to load until its first use, deep in main.
      value = flags.FLAGS[name].value
      if type(value).__name__ == "_ErrorConfig":
        raise object.__getattribute__(value, "_error")
    return args
  except Exception as e:  # noqa: BLE001 - every parse failure is a bad argument
    if "--verbose" in argv:
      traceback.print_exc()
    fail(f"bad arguments: {flag_error_text(e, argv)}", EXIT_USAGE)


_FIELDS_DOC = ("The fields and their docs: ztt_jax/config.py, ztt_jax/model/config.py, "
               "ztt_jax/data/config.py.")


def flag_error_text(e: BaseException, argv) -> str:
  """One line for an exception raised while parsing flags; names the flag and the fix."""
  chain = _chain(e)
  text = " ".join(str(x) for x in chain)
  # An unknown field in a --config.a.b=v override: ml_collections says 'stepz'\nDid you mean "steps"?
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  m = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  if m is not None:
    good, bad = m.group(1), m.group(2)
    flag = next((o for o in overrides if o.rsplit(".", 1)[-1] == bad), f"--config.*.{bad}")
    return f"{flag}: the config has no field {bad!r}; did you mean {good!r}? {_FIELDS_DOC}"
  if isinstance(e, (KeyError, AttributeError)):
    key = next((str(x.args[0]).strip("'\"") for x in chain if isinstance(x, KeyError) and x.args), None)
    flag = next((o for o in overrides if key and o.rsplit(".", 1)[-1] == key), None)
    if flag is not None:
      return f"{flag}: the config has no field {key!r}. {_FIELDS_DOC}"
  config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if "Failed loading config file" in text or "Path to config file is an empty string" in text:
    errno = re.search(r"\[Errno \d+\] [^\n]*", text)
    reason = errno.group(0) if errno else _last_line(chain).rstrip(".")
    if config is None:  # the default, relative to the current directory
      tried = re.search(r"Attempted \[Relative path\]:\s*(\S+)", text)
      config = f"{tried.group(1) if tried else '?'} (the default)"
    return (f"cannot load --config={config}: {reason}. Give a config file such as "
            "--config=configs/default.py (optionally :ARG), relative to the current directory.")
  if "Error whilst parsing config file" in text:
    last = [l.strip() for l in str(e).strip().splitlines() if l.strip()][-1]
    return f"--config={config}: its get_config() raised {last}"
  if isinstance(e, SyntaxError) or any(isinstance(x, SyntaxError) for x in chain):
    s = next(x for x in chain if isinstance(x, SyntaxError))
    return f"the config file {s.filename} has a syntax error at line {s.lineno}: {s.msg}."
  if "get_config" in text and isinstance(e, AttributeError):
    return f"--config={config} defines no get_config(); a config file must define get_config(arg=None)."
  from absl import flags
  if isinstance(e, flags.Error):
    return f"{_one_line(str(e))} (--helpshort lists the flags)"
  return f"{type(e).__name__}: {_last_line(chain)}"


def _chain(e: BaseException) -> list:
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    out.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return out


def _last_line(chain: list) -> str:
  for x in chain:
    lines = [l.strip() for l in str(x).strip().splitlines() if l.strip()]
    if lines:
      return f"{type(x).__name__}: {lines[-1]}"
  return type(chain[0]).__name__


# ------------------------------------------------------------------ tools that load a trained run

def define_trained_run_flags() -> None:
  """--workdir, --step, --exit_threshold and --frozen_kv: the flags of a tool that loads a trained
  run and picks its exit rule (evaluate, generate); `load_trained_run` reads them."""
  from absl import flags
  # --helpshort lists the main module's flags, which absl files under sys.argv[0].
  main = {"module_name": sys.argv[0]}
  flags.DEFINE_string("workdir", None, "Work directory of a training run.", required=True, **main)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", **main)
  flags.DEFINE_string("exit_threshold", None, "Threshold on the run's exit signal (model.exit_signal), or "
                      "'none' for no exit (default: model.exit_threshold).", **main)
  flags.DEFINE_enum("frozen_kv", None, ["state", "stack"],
                    "Override model.frozen_kv, what an exited token shows later tokens: 'state' (K/V of "
                    "its frozen state; generation skips its remaining cycles) or 'stack' (no skipping).",
                    **main)


def threshold_flag(text: Optional[str]) -> dict:
  """--exit_threshold as ExitRule overrides: unset keeps model.exit_threshold, none turns exit off."""
  if text is None:
    return {}
  if text.strip().lower() in ("none", "off", ""):
    return {"threshold": None}
  try:
    return {"threshold": float(text)}
  except ValueError:
    raise errors.ConfigError(f"--exit_threshold={text!r}: give a number (e.g. 0.5) or none") from None


def load_trained_run(*, devices=None, **rule_fields):
  """(restore.TrainedRun, model.exit.ExitRule) that the flags of `define_trained_run_flags` name:
  the rule is the run's configured one with `rule_fields`, then --exit_threshold/--frozen_kv, applied.
  A bad --exit_threshold is reported before the checkpoint loads."""
  from absl import flags
  from ztt_jax import restore
  from ztt_jax.model.exit import ExitRule
  FLAGS = flags.FLAGS
  overrides = {**rule_fields, **threshold_flag(FLAGS.exit_threshold)}
  if FLAGS.frozen_kv:
    overrides["frozen_kv"] = FLAGS.frozen_kv
  trained = restore.load_trained(FLAGS.workdir, FLAGS.step, devices=devices)
  return trained, ExitRule.from_config(trained.cfg.model, **overrides)
