"""Every path the program reads or writes: a local path or a `gs://` URL, through one layer (`etils.epath`).

Run directories, sources, data directories and output files are strings in configs and flags; the I/O code
turns them into `epath.Path`s here, so a URL is never handed to `os` / `open` (which would create a local
folder named `gs:`). Checkpoints go to orbax with the same path (orbax and TensorStore write `gs://` themselves);
everything else (config.json, metrics.jsonl, summary.json, TensorBoard events, certify files, exports, dataset
files) goes through `path(...)`, which gcsfs serves for `gs://`.

Object stores cannot append: `Appender` keeps a small text file's content and rewrites the object on each
flush (metrics.jsonl, TensorBoard event files), and appends in place on a local disk.

  run = paths.path('gs://bucket/runs/x')           # epath.Path; 'runs/x' gives a local one
  paths.check_access('gs://bucket/runs/x')          # one-line PathError: unknown scheme, no bucket, no credentials
  paths.check_writable('runs/x', directory=True)     # one-line PathError: a file there, or a read-only folder
  (run / 'config.json').write_text('{}')
  paths.join('gs://bucket/runs/x', 'checkpoints')   # 'gs://bucket/runs/x/checkpoints'

Readers that open files in C++ and take local paths only (ArrayRecord's, under TFDS) read a copy that
`cached_copy` makes once in a local cache (`$HYDRA_JAX_CACHE`, else `~/.cache/hydra_jax`):

  local = paths.cached_copy('gs://bucket/tfds/cifar10/3.0.2', ['dataset_info.json', ...])

Tests and local development reach a GCS emulator through `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage)
and `TENSORSTORE_GCS_HTTP_URL` (orbax's TensorStore); with the emulator no credentials are needed.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile

import fsspec
from etils import epath

from hydra_jax import errors

SCHEMES = ("gs",)  # URL schemes served (gcsfs for files, TensorStore for orbax's arrays)
# A listing must show what other processes (and TensorStore) wrote since: a resumed or multi-host run, or a
# notebook reading a run that goes on elsewhere. gcsfs would otherwise answer from its cache of earlier listings.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CREDENTIALS_FIX = (
  "give this machine Google Cloud credentials: on a TPU/GCE VM its service account (with Storage access), "
  "elsewhere `gcloud auth application-default login` or GOOGLE_APPLICATION_CREDENTIALS=<key.json>"
)


class PathError(errors.UserError):
  """A path that cannot be used: unknown URL scheme, a bucket that does not exist, missing credentials."""


def scheme(location: str | os.PathLike) -> str:
  """The URL scheme of `location` ('gs'), or '' for a local path."""
  match = _URL.match(os.fspath(location))
  return match.group(1).lower() if match else ""


def is_remote(location: str | os.PathLike) -> bool:
  """True for a URL (`gs://...`), False for a local path."""
  return bool(scheme(location))


def path(location: str | os.PathLike) -> epath.Path:
  """`location` as an `epath.Path`: a URL as it is, a local path made absolute.

  Raises:
    PathError: a URL scheme other than those of `SCHEMES`.
  """
  location = os.fspath(location)
  found = scheme(location)
  if found and found not in SCHEMES:
    raise PathError(
      f"{location}: unknown URL scheme '{found}://'; hydra_jax reads and writes local paths and "
      f"{', '.join(s + '://' for s in SCHEMES)} URLs"
    )
  return epath.Path(location) if found else epath.Path(os.path.abspath(os.path.expanduser(location)))


def join(location: str | os.PathLike, *parts: str) -> str:
  """`location`/`parts` as a string (a URL stays a URL; a local path stays relative if it was)."""
  location = os.fspath(location)
  if is_remote(location):
    return str(path(location).joinpath(*parts))
  return os.path.join(location, *parts)


def _bucket(location: str) -> str:
  return location.split("://", 1)[1].split("/", 1)[0]


def check_access(location: str | os.PathLike) -> None:
  """Raises a one-line PathError when `location` cannot be reached: unknown scheme, no credentials, no bucket.

  Local paths and the emulator (`STORAGE_EMULATOR_HOST` set: no credentials needed) pass the credential check;
  a `gs://` bucket is looked up once. Nothing is created.
  """
  location = os.fspath(location)
  path(location)  # the scheme check
  if scheme(location) != "gs":
    return
  if not os.environ.get("STORAGE_EMULATOR_HOST"):
    import google.auth  # pylint: disable=g-import-not-at-top  (a dependency of gcsfs)
    import google.auth.exceptions  # pylint: disable=g-import-not-at-top

    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as error:
      first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
      raise PathError(f"{location}: no Google Cloud credentials ({first_line}); {_CREDENTIALS_FIX}") from error
  bucket = _bucket(location)
  try:
    exists = epath.Path(f"gs://{bucket}").exists()
  except OSError as error:
    raise PathError(f"{location}: cannot reach bucket gs://{bucket} ({error}); {_CREDENTIALS_FIX}") from error
  if not exists:
    raise PathError(
      f"{location}: bucket gs://{bucket} does not exist (or this account cannot see it); create it with "
      f"`gcloud storage buckets create gs://{bucket}` or fix the name"
    )


def check_writable(location: str | os.PathLike, *, directory: bool) -> None:
  """Raises a one-line PathError when the local `location` cannot be written, before any work is done: a file
  where a folder must be (the location or one of its parents), a folder where a file must be, or a read-only
  folder or file. Nothing is created. A URL passes (`check_access` checks its bucket).

  Args:
    location: the path to write.
    directory: True for a folder to create or write in (a run directory), False for a file to create or replace.
  """
  if is_remote(location):
    return
  target = os.path.abspath(os.path.expanduser(os.fspath(location)))
  if os.path.exists(target):
    if directory != os.path.isdir(target):
      raise PathError(
        f"{location} is a {'file' if directory else 'directory'}; give a {'directory' if directory else 'file'}"
      )
    writable = [target] if directory else [target, os.path.dirname(target)]
  else:
    folder = os.path.dirname(target)
    while not os.path.exists(folder):
      folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
      raise PathError(f"{location}: {folder} is a file, not a directory")
    writable = [folder]
  for existing in writable:
    if not os.access(existing, os.W_OK | (os.X_OK if os.path.isdir(existing) else 0)):
      raise PathError(f"{location}: {existing} is not writable (permission denied or a read-only file system)")


def cache_dir() -> str:
  """The local folder of copies of remote files: `$HYDRA_JAX_CACHE`, else `~/.cache/hydra_jax`."""
  return os.environ.get("HYDRA_JAX_CACHE") or os.path.expanduser(os.path.join("~", ".cache", "hydra_jax"))


def cache_path(location: str | os.PathLike) -> str:
  """Where `cached_copy` puts the URL `location`: `<cache_dir>/<scheme>/<bucket>/<path>` (one folder per URL)."""
  location = os.fspath(location)
  relative = posixpath.normpath("/" + location.split("://", 1)[1]).lstrip("/")  # no '..' above the cache
  return os.path.join(cache_dir(), scheme(location), *relative.split("/"))


def cached_copy(location: str | os.PathLike, names: list[str]) -> str:
  """The local copy of the files `names` of the remote folder `location`, made once in the local cache.

  A file already there with the remote one's size and modification time (set on each copy) is kept; any other
  (missing, damaged, or older or newer than the remote one) is copied to a temporary name in the same
  folder and renamed, so an interrupted copy is never read under its name. Each process that calls this (every
  host of a multi-host run, each with its own disk) makes or reuses its own copy.

  Args:
    location: a folder URL (`gs://bucket/...`).
    names: names of files in it.

  Returns:
    `cache_path(location)`, the local folder holding the copies.
  """
  remote, local = path(location), cache_path(location)
  os.makedirs(local, exist_ok=True)
  for name in names:
    source, target = remote / name, os.path.join(local, name)
    stat = source.stat()
    size, mtime = stat.length, int(stat.mtime)
    if os.path.isfile(target) and (os.path.getsize(target), int(os.path.getmtime(target))) == (size, mtime):
      continue
    _copy_atomically(source, target, mtime)
  return local


def _copy_atomically(source: epath.Path, target: str, mtime: int) -> None:
  """Copies `source` to the local file `target`, given modification time `mtime` (seconds since the epoch),
  through a temporary file beside it (removed on failure)."""
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.")
  try:
    with os.fdopen(handle, "wb") as writer, source.open("rb") as reader:
      shutil.copyfileobj(reader, writer, 16 << 20)
    os.utime(temporary, (mtime, mtime))
    os.replace(temporary, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temporary)
    raise


class Appender:
  """A text file that grows by lines: appended in place on disk, rewritten whole on an object store.

  Args:
    location: the file (local path or URL).
    keep: keep its existing content (False: start it empty).
  """

  def __init__(self, location: str | os.PathLike, keep: bool = True):
    self._path = path(location)
    self._remote = is_remote(location)
    self._file = None
    self._content = ""
    if self._remote:
      self._content = self._path.read_text() if keep and self._path.exists() else ""
    else:
      self._path.parent.mkdir(parents=True, exist_ok=True)
      self._file = self._path.open("a" if keep else "w")

  def write(self, text: str) -> None:
    """Appends `text` and makes it durable (local: flush; remote: the whole object is rewritten)."""
    if self._remote:
      self._content += text
      self._path.write_text(self._content)
    else:
      self._file.write(text)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class _BinaryObjectWriter:
  """tensorboardX's record-writer interface over an object store: the event file is rewritten on each flush."""

  def __init__(self, location: str):
    self._path, self._buffer = path(location), bytearray()

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    self._path.write_bytes(bytes(self._buffer))

  def close(self) -> None:
    self.flush()


class _TensorBoardFactory:
  """tensorboardX's writer factory for `gs://` event files, through this module instead of its own GCS client."""

  def open(self, location: str) -> _BinaryObjectWriter:
    return _BinaryObjectWriter(location)

  def directory_check(self, location: str) -> None:
    path(location).mkdir(parents=True, exist_ok=True)


def register_tensorboard_writers() -> None:
  """Makes tensorboardX write `gs://` event files through this module."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top  (optional dependency)

  for name in SCHEMES:
    record_writer.register_writer_factory(name, _TensorBoardFactory())
