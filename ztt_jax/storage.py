"""One path layer for everything a run reads or writes: local paths and object-store URLs
(`gs://bucket/...`, also `s3://`) alike, through `etils.epath`, the layer Orbax writes checkpoints
with (fsspec and gcsfs underneath for `gs://`; credentials come from the environment).

What an object store does not have, and what is used instead:

- no append: a file that grows (metrics.jsonl) is rewritten whole (`write_text`); one object write
  is all-or-nothing, so a reader sees the old object or the new one, never a mix;
- no atomic directory rename: a directory of outputs is uploaded file by file with its marker
  file last, and readers take a directory without the marker as unfinished (ztt_jax.outdir);
- no hard link: create-if-absent (the lease) is an upload with the precondition "no object of this
  name" (GCS `ifGenerationMatch=0`), and a delete can be made conditional on the generation read;
- no memory map, and readers (ArrayRecord, np.memmap) that want a local file: data under a URL is
  copied once to a local mirror (`local_copy`) keyed by the object's name, size and mtime.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
from typing import Optional

from etils import epath

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path) -> bool:
  """True for an object-store URL (gs://, s3://...); False for a local path."""
  return bool(_URL.match(str(path)))


def absolute(path) -> str:
  """A URL as given (without a trailing slash); a local path made absolute. os.path.abspath on a
  URL would turn gs://b/x into <cwd>/gs:/b/x, a local directory named `gs:`."""
  path = str(path)
  if is_url(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest) if rest.strip('/') else rest}"
  return os.path.abspath(os.path.expanduser(path))


def join(base, *names: str) -> str:
  return str(epath.Path(base).joinpath(*names)) if is_url(base) else os.path.join(base, *names)


def parent(path) -> str:
  path = str(path)
  if is_url(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
  return os.path.dirname(path)


def path(p) -> epath.Path:
  return epath.Path(p)


def _fs(url: str):
  """The fsspec file system and in-store path of `url`: for the few operations epath does not
  expose (create-if-absent, a conditional delete, the object's generation)."""
  import fsspec
  fs, inner = fsspec.core.url_to_fs(url)
  return fs, inner


def _fresh(url: str):
  """(fs, in-store path) with fsspec's cached listings of the path (and its parents) dropped: another
  process, or another file-system instance here (etils keeps its own), may have changed it."""
  fs, inner = _fs(url)
  inner = inner.rstrip("/")
  fs.invalidate_cache(inner)
  return fs, inner


def exists(p) -> bool:
  if is_url(p):
    fs, inner = _fresh(str(p))
    return fs.exists(inner)
  return os.path.exists(p)


def isdir(p) -> bool:
  """A local directory, or a URL under which objects exist (object stores have no directories)."""
  if is_url(p):
    fs, inner = _fresh(str(p))
    return fs.isdir(inner)
  return os.path.isdir(p)


def isfile(p) -> bool:
  if is_url(p):
    fs, inner = _fresh(str(p))
    return fs.isfile(inner)
  return os.path.isfile(p)


def listdir(p) -> list[str]:
  if is_url(p):
    fs, inner = _fresh(str(p))
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(inner, detail=False))
  return sorted(os.listdir(p))


def files(p) -> list[str]:
  """Every file under directory `p` (on an object store: every object under the prefix `p/`), as
  sorted '/'-separated paths relative to `p`; [] if there are none."""
  p = str(p)
  if not is_url(p):
    return sorted(os.path.relpath(os.path.join(d, n), p).replace(os.sep, "/")
                  for d, _, names in os.walk(p) for n in names)
  fs, inner = _fresh(p)
  return sorted(posixpath.relpath(o, inner) for o in fs.find(inner) if o.startswith(inner + "/"))


def copy(src, dst) -> None:
  """Copies one file, either side local or a URL."""
  epath.Path(src).copy(epath.Path(dst), overwrite=True)


def makedirs(p) -> None:
  """Local: creates the directory. URL: nothing to create (a prefix exists once an object does)."""
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return epath.Path(p).read_text()


def read_bytes(p) -> bytes:
  return epath.Path(p).read_bytes()


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode())


def write_bytes(p, data: bytes) -> None:
  """Replaces `p` with `data` at once. Local: a temporary file beside it, fsynced, renamed over it.
  URL: one object upload, which a reader sees whole or not at all."""
  p = str(p)
  if is_url(p):
    epath.Path(p).write_bytes(data)
    _fs(p)[0].invalidate_cache(p)
    return
  tmp = f"{p}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def create_new(p, data: bytes) -> bool:
  """Writes `data` to `p` if nothing is there; False if something is. Atomic: of two writers, one
  wins. Local: written under a temporary name and hard-linked (atomic on local and NFS file
  systems). URL: an upload with the precondition that no object has the name (GCS ifGenerationMatch=0)."""
  p = str(p)
  if is_url(p):
    fs, inner = _fs(p)
    try:
      fs.pipe_file(inner, data, mode="create")
      return True
    except FileExistsError:
      return False
    finally:
      fs.invalidate_cache(inner)
  tmp = f"{p}.new-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, p)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)


def generation(p) -> Optional[str]:
  """The object's generation (GCS): changes with every write; None for a local file or no object."""
  p = str(p)
  if not is_url(p):
    return None
  fs, inner = _fs(p)
  fs.invalidate_cache(inner)
  try:
    g = fs.info(inner).get("generation")
  except FileNotFoundError:
    return None
  return None if g is None else str(g)


def delete(p, if_generation: Optional[str] = None) -> bool:
  """Deletes `p`; False if it was gone. With `if_generation` (GCS): only if the object is still that
  generation, so a delete never removes what another writer put there after it was read."""
  p = str(p)
  if not is_url(p):
    try:
      os.remove(p)
      return True
    except FileNotFoundError:
      return False
  fs, inner = _fs(p)
  try:
    if if_generation is not None and p.startswith("gs://"):
      bucket, key = inner.split("/", 1)
      fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=if_generation)
    else:
      fs.rm_file(inner)
    return True
  except (FileNotFoundError, FileExistsError):  # gone, or changed since (412 Precondition Failed)
    return False
  finally:
    fs.invalidate_cache(inner)


def rmtree(p) -> None:
  epath.Path(p).rmtree(missing_ok=True)


def upload(local: str, url: str) -> None:
  """Copies a local file or directory tree to `url` (files in sorted order)."""
  if os.path.isdir(local):
    for rel in files(local):
      copy(os.path.join(local, *rel.split("/")), join(url, *rel.split("/")))
  else:
    copy(local, url)


def mirror_dir(cache_dir: Optional[str] = None) -> str:
  """Where copies of remote data go: data.cache_dir/remote when it is local, else the user cache."""
  if cache_dir and not is_url(cache_dir):
    return os.path.join(cache_dir, "remote")
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ztt_jax", "remote")


def local_copy(p, cache_dir: Optional[str] = None) -> str:
  """`p` itself if local; for a URL, a local copy of the object (or of every object under the
  prefix), made once and reused while each object's size and mtime are unchanged. The copies keep
  the objects' mtimes, so a fingerprint of the copy is the same on every host."""
  p = str(p)
  if not is_url(p):
    return p
  fs, inner = _fs(p)
  fs.invalidate_cache(inner)
  inner = inner.rstrip("/")
  if fs.isfile(inner):
    objects = {inner: fs.info(inner)}
  else:
    objects = fs.find(inner, detail=True)
    if not objects:
      raise FileNotFoundError(2, "No such file or directory", p)
  dest_root = os.path.join(mirror_dir(cache_dir), hashlib.sha256(p.encode()).hexdigest()[:16],
                           posixpath.basename(inner))
  for obj, info in sorted(objects.items()):
    rel = posixpath.relpath(obj, inner)
    dest = dest_root if rel == "." else os.path.join(dest_root, *rel.split("/"))
    size, mtime = int(info["size"]), _mtime(info)
    if (os.path.isfile(dest) and os.path.getsize(dest) == size
        and (mtime is None or int(os.path.getmtime(dest)) == int(mtime))):
      continue
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    fs.get_file(obj, tmp)
    if mtime is not None:
      os.utime(tmp, (mtime, mtime))
    os.replace(tmp, dest)
    log.info("Copied %s://%s to %s (%d bytes).", p.split("://")[0], obj, dest, size)
  return dest_root


def _mtime(info: dict) -> Optional[float]:
  from datetime import datetime
  for k in ("updated", "mtime", "LastModified", "timeCreated"):
    v = info.get(k)
    if isinstance(v, (int, float)):
      return float(v)
    if isinstance(v, str):
      try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
      except ValueError:
        pass
    if hasattr(v, "timestamp"):
      return v.timestamp()
  return None
