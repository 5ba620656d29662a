"""A real local Cloud Storage server for tests: gcp-storage-emulator (PyPI) on a free 127.0.0.1 port.

`emulator()` starts it (with the generation headers of real GCS: gcs_emulator_server.py) as a subprocess with
one bucket, `bucket`, in memory, and points this process and its children at it: `STORAGE_EMULATOR_HOST`
(gcsfs, google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` (orbax's TensorStore), so `gs://bucket/...` paths
work with anonymous credentials.
"""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import portpicker

BUCKET = "bucket"


def _wait_for_port(port: int, process: subprocess.Popen, log, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      log.seek(0)
      raise RuntimeError(f"the GCS emulator exited with {process.returncode}: {log.read()}")
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
      return
    time.sleep(0.1)
  raise RuntimeError(f"the GCS emulator did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def emulator():
  """Runs the emulator for the duration of the block; yields its URL. Restores the environment after."""
  port = portpicker.pick_unused_port()
  # Its error reports go to a file: a pipe that nobody reads fills up and stalls the (single-threaded) server.
  log = tempfile.TemporaryFile("w+")
  process = subprocess.Popen(
    [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator_server.py"), "start",
     "--host=127.0.0.1", f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
    stdout=subprocess.DEVNULL,
    stderr=log,
  )  # fmt: skip
  url = f"http://127.0.0.1:{port}"
  settings = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    # gcsfs's optional lookup of a bucket's layout uses a control-plane API the emulator lacks (one warning
    # per bucket); plain GCS calls are what a real bucket gets too.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  saved = {name: os.environ.get(name) for name in settings}
  try:
    _wait_for_port(port, process, log)
    os.environ.update(settings)
    yield url
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    process.terminate()
    process.wait(30)
    log.close()
