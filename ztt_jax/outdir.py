"""Output directories that never destroy what they did not write.

Export, the GPT-2 import and `--export_hf` all write a whole directory. The rules, shared here:

- An existing non-empty `--out` is refused unless `overwrite=True`, and even then it is replaced
  only if it is one of ours: `is_ours(path)` recognises what the writer itself leaves there (the
  export's config.json format key, or `--export_hf`'s marker file) and nothing else is in it.
- `--out` may not be, or lie inside, a source it reads from (nor the source inside `--out`):
  replacing it would delete the input.
- The write is atomic: everything goes to a temporary directory `.NAME.tmp-PID-*` beside `--out`,
  which is then exchanged with the old directory in one `renameat2(RENAME_EXCHANGE)` (Linux), and
  only then is the old one deleted. A kill -9 at any moment leaves `--out` whole, old or new.
  Where the exchange is missing (macOS, some network file systems), the old directory is renamed
  aside to `.NAME.old-PID-*` and the new one in: a kill between the two leaves `--out` missing, and
  the next write to that path (or `recover`) renames the old one back first. Leftover
  `.NAME.tmp-*`/`.NAME.old-*` directories of writers that are gone are removed, with a warning, by
  the next write to that path.
- On an object store (`--out=gs://...`), which has no directory rename, the same promises are kept
  with markers (`write_atomic` -> `_write_url`): the files are built in a local temporary directory,
  then `WRITING` is uploaded first (naming the writer's format), the old completion marker (the
  export's config.json, `--export_hf`'s marker file) deleted, the new files uploaded, objects of
  the old output that the new one lacks deleted, the new completion marker uploaded last, and
  `WRITING` deleted. A kill at any moment leaves a prefix that is either finished (marker, no
  `WRITING`) or recognisably ours and unfinished (`WRITING`): readers refuse it in one line
  ("not a finished export ... rerun the export") and the next `--overwrite` replaces it. What is
  not kept: the old output itself, once the write has started (there is no swap); and two writers
  to one URL at the same time are not told apart.
- A full disk is one DiskFullError naming the directory and the free space; the old `--out` stays.
- Permissions follow the umask, as files written by `open()` do: `tempfile.mkdtemp` would leave
  the directory owner-only (0700), unreadable to the rest of a shared cluster.

A training run's `--workdir` is the other kind: reused on purpose (re-running resumes from it), so
`check_workdir` only checks that it can be one, and `make_workdir` creates it once the run's config
has passed every check.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Callable, Iterable, Mapping, Optional

from ztt_jax import storage
from ztt_jax.errors import ConfigError, DiskFullError, OutputError, is_disk_full

log = logging.getLogger(__name__)

# Uploaded first and deleted last by a write to an object store: while it is there, the prefix is an
# unfinished output of ours (its JSON names the writer's format), never a finished one.
WRITING = ".ztt_jax_writing"


def umask() -> int:
  mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
  os.umask(mask)
  return mask


def _real(path: str) -> str:
  if storage.is_url(path):
    return storage.absolute(path)
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check(out: Optional[str], *, overwrite: bool, is_ours: Callable[[str], Optional[str]],
          sources: Mapping[str, Optional[str]] = (), what: str = "an export", flag: str = "--out") -> str:
  """Absolute `out` if writing there is allowed, else OutputError naming the fix.

  is_ours(path) -> None if `path` (an existing non-empty directory) was written by this writer and
  holds nothing else, or a short reason why not (shown to the user).
  sources: {flag name: path} of the inputs, e.g. {"--workdir": workdir}.
  """
  if not out or not str(out).strip():
    raise OutputError(f"{flag} is empty; give the directory to write {what} to.")
  url = storage.is_url(out)
  path = storage.absolute(out) if url else os.path.abspath(os.path.expanduser(out))
  real = _real(path)
  for name, src in dict(sources).items():
    if not src:
      continue
    src_real = _real(src)
    if _inside(real, src_real):
      where = "is" if real == src_real else "is inside"
      raise OutputError(f"{flag}={path} {where} {name}={src}, the input it is made from; writing there "
                        f"would destroy the input. Choose a {flag} outside {src}.")
    if _inside(src_real, real):
      raise OutputError(f"{name}={src} is inside {flag}={path}; replacing {path} would delete the input. "
                        f"Choose a {flag} that does not contain {src}.")
  if url:
    is_file, nonempty = storage.isfile(path), bool(storage.files(path))
  else:
    recover(path)  # an old output renamed aside by a write that was killed goes back first
    is_file = os.path.lexists(path) and not os.path.isdir(path)
    nonempty = os.path.isdir(path) and bool(os.listdir(path))
  if is_file:
    raise OutputError(f"{flag}={path} exists and is not a directory; choose a new path.")
  if nonempty:
    if not overwrite:
      raise OutputError(f"{flag}={path} exists and is not empty; choose a new path, or pass --overwrite "
                        f"to replace it (only {what} written by ztt_jax is ever replaced).")
    reason = is_ours(path)
    if reason is not None:
      raise OutputError(f"{flag}={path} is not {what} written by ztt_jax ({reason}); refusing to replace "
                        "it even with --overwrite. Choose a new path, or move its contents away yourself.")
  return path


def only_known_entries(path: str, known: Iterable[str]) -> Optional[str]:
  """None if every entry of `path` is in `known` (or is `WRITING`), else a reason naming the others."""
  extra = sorted(set(storage.listdir(path)) - set(known) - {WRITING})
  if extra:
    shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
    return f"it also holds {shown}, which ztt_jax did not write"
  return None


def unfinished(path: str) -> Optional[dict]:
  """What `WRITING` in `path` says ({"format", "pid", "host", "started"}) if a write to `path` was
  interrupted (or is under way), else None."""
  marker = storage.join(path, WRITING)
  if not storage.exists(marker):
    return None
  try:
    got = json.loads(storage.read_text(marker))
  except (OSError, ValueError):
    got = None
  return got if isinstance(got, dict) else {}


def write_atomic(path: str, fill: Callable[[str], None], *, marker: Optional[str] = None,
                 fmt: Optional[str] = None) -> str:
  """Runs fill(tmp_dir), then swaps tmp_dir in at `path` (see the module docstring). `marker`: the
  file that fill writes last, whose presence marks a finished output, and `fmt` the writer's format;
  an object store needs both (its write is ordered by them, not swapped)."""
  if storage.is_url(path):
    return _write_url(storage.absolute(path), fill, marker, fmt)
  path = os.path.abspath(path)
  parent, base = os.path.dirname(path), os.path.basename(path)
  os.makedirs(parent, exist_ok=True)
  recover(path)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{os.getpid()}-", dir=parent)
  try:
    try:
      fill(tmp)
    except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
      if is_disk_full(e):
        raise _disk_full(path, e) from None
      raise
    _apply_umask(tmp)
    _swap_in(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _write_url(url: str, fill: Callable[[str], None], marker: Optional[str], fmt: Optional[str]) -> str:
  """The object-store form of the swap: WRITING first, the completion marker last (module docstring)."""
  if not marker or not fmt:
    raise ValueError("writing an output to an object store needs its completion marker and format")
  with tempfile.TemporaryDirectory(prefix="ztt_jax_out-") as tmp:
    try:
      fill(tmp)
    except Exception as e:  # noqa: BLE001 - re-raised unless the (local) disk is full
      if is_disk_full(e):
        free = shutil.disk_usage(tmp).free
        raise DiskFullError(f"No space left building {url} in {tmp} ({free / 2**20:.1f} MiB free); nothing was "
                            "uploaded. Free some space there (or set TMPDIR to a larger disk) and rerun.") from None
      raise
    new = storage.files(tmp)
    if marker not in new:
      raise ValueError(f"the output for {url} lacks its completion marker {marker}")
    old = set(storage.files(url))
    storage.write_text(storage.join(url, WRITING), json.dumps(
        {"format": fmt, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    storage.delete(storage.join(url, marker))  # from here on, readers see an unfinished output
    for rel in new:
      if rel != marker:
        storage.copy(os.path.join(tmp, *rel.split("/")), storage.join(url, *rel.split("/")))
    # Only names the output check found ours (is_ours listed them) are deleted; the finished prefix
    # then holds exactly the new output.
    for rel in sorted(old - set(new) - {WRITING, marker}):
      storage.delete(storage.join(url, *rel.split("/")))
    storage.copy(os.path.join(tmp, marker), storage.join(url, marker))
    storage.delete(storage.join(url, WRITING))
  return url


def _disk_full(path: str, e: Exception) -> DiskFullError:
  free = shutil.disk_usage(os.path.dirname(path)).free
  kept = f"the previous {path} is unchanged" if os.path.isdir(path) else f"nothing was written at {path}"
  return DiskFullError(f"No space left writing {path} ({getattr(e, 'strerror', None) or 'no space left on device'}, {free / 2**20:.1f} MiB free on its disk); "
                     f"{kept}. Free some space, or choose an --out on another disk, and rerun.")


def _swap_in(tmp: str, path: str) -> None:
  """tmp becomes `path`; the old `path` (if any) is deleted once nothing can need it."""
  if not os.path.isdir(path):
    os.rename(tmp, path)
    return
  if _exchange(tmp, path):
    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
    return
  parent, base = os.path.dirname(path), os.path.basename(path)
  # Renaming onto an empty directory replaces it atomically; mkdtemp gives a fresh name.
  aside = tempfile.mkdtemp(prefix=f".{base}.old-{os.getpid()}-", dir=parent)
  try:
    os.rename(path, aside)
  except BaseException:
    os.rmdir(aside)
    raise
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(aside, path)  # put the previous output back
    raise
  shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2); False where the OS or file system cannot."""
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
  if renameat2 is None:
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here: fall back
    return False
  raise OSError(err, os.strerror(err), b)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def recover(path: str) -> None:
  """Cleans up after an interrupted write to `path`: an old output renamed aside while `path` is
  missing is renamed back, and leftovers of writers that are gone are removed (with a warning).
  A leftover of a live writer on this host is left alone."""
  path = os.path.abspath(path)
  parent, base = os.path.dirname(path), os.path.basename(path)
  if not os.path.isdir(parent):
    return
  pattern = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)-[^/]*$")
  leftovers = sorted((m.group(1), int(m.group(2)), os.path.join(parent, m.group(0)))
                     for m in map(pattern.match, os.listdir(parent)) if m)
  dead = [(kind, p) for kind, pid, p in leftovers if not _pid_alive(pid) and os.path.isdir(p)]
  olds = [p for kind, p in dead if kind == "old"]
  if not os.path.lexists(path) and olds:
    os.rename(olds[-1], path)
    log.warning("%s was missing after an interrupted write; restored the previous output from %s.",
                path, olds[-1])
    dead = [(kind, p) for kind, p in dead if p != olds[-1]]
  for kind, p in dead:
    shutil.rmtree(p, ignore_errors=True)
    log.warning("Removed %s, left by an interrupted write to %s.", p, path)


def _apply_umask(root: str) -> None:
  mask = umask()
  os.chmod(root, 0o777 & ~mask)
  for d, dirs, files in os.walk(root):
    for name in dirs:
      os.chmod(os.path.join(d, name), 0o777 & ~mask)
    for name in files:
      os.chmod(os.path.join(d, name), 0o666 & ~mask)


def check_workdir(workdir) -> str:
  """The absolute work directory, or ConfigError if it is empty, a file, or cannot be written.
  Creates nothing: a run stopped by a bad config leaves no empty directory behind."""
  if workdir is None or not str(workdir).strip():
    raise ConfigError("--workdir is empty; give the run's directory, e.g. --workdir=runs/my_run (it is "
                      "created if missing; re-running the same command resumes from it).")
  if storage.is_url(workdir):
    return _check_url_workdir(storage.absolute(workdir))
  path = os.path.abspath(os.path.expanduser(str(workdir)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir={path} is a file, not a directory; choose another path.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir={path} cannot be created: {existing} is a file, not a directory.")
  try:  # a real write, not os.access: root, ACLs and read-only mounts make access() say yes wrongly
    os.rmdir(tempfile.mkdtemp(prefix=".ztt_jax_write_check-", dir=existing))
  except OSError as e:
    raise ConfigError(f"--workdir={path} cannot be written: {existing} refuses new entries "
                      f"({e.strerror}); choose a directory you can write.") from None
  return path


def _check_url_workdir(url: str) -> str:
  """An object-store workdir: not an object itself, and writable (a probe object is created and
  deleted, which names a missing bucket or missing credentials before anything is compiled)."""
  probe = storage.join(url, f".ztt_jax_write_check-{os.getpid()}")
  try:
    if storage.exists(url) and not storage.isdir(url):
      raise ConfigError(f"--workdir={url} is an object, not a folder; choose another path.")
    storage.create_new(probe, b"")
    storage.delete(probe)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - every store says "no bucket" or "no access" its own way
    raise ConfigError(f"--workdir={url} cannot be written ({type(e).__name__}: {str(e)[:200]}); check that "
                      "the bucket exists and that the credentials in the environment may write it "
                      "(GOOGLE_APPLICATION_CREDENTIALS, or the VM's service account).") from None
  return url


def make_workdir(workdir: str, *subdirs: str) -> None:
  """Creates the work directory (checked by `check_workdir`) and `subdirs` inside it (nothing to
  create on an object store, where a folder exists once an object does)."""
  try:
    for d in subdirs or (workdir,):
      storage.makedirs(d)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created ({e.strerror}: {e.filename}); choose a "
                      "directory you can write.") from None
