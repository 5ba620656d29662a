"""Dataset files on disk: the formats `data.format` selects and the readers that give random access to them.

Users of the reference already hold their data as its torchvision loaders read it; these readers take those
files as they are (no TensorFlow, no download):

| format         | datasets                  | files in data_dir (or in the sub-folder named)                          |
|----------------|---------------------------|-------------------------------------------------------------------------|
| `tfds`         | mnist, cifar10, cifar100, | `<name>/<version>/` ArrayRecord files built once with `tfds build`      |
|                | svhn_cropped, imagenet2012|                                                                         |
| `cifar_pickle` | cifar10, cifar100         | `cifar-10-batches-py/`: data_batch_1..5, test_batch;                    |
|                |                           | `cifar-100-python/`: train, test (fine labels)                          |
| `svhn_mat`     | svhn_cropped              | `train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat` (or `SVHN/`)     |
| `image_folder` | imagenet2012              | `train/<class>/*.JPEG`, `val/<class>/*.JPEG` (torchvision's ImageFolder)|

`data_dir` may be a local folder or a `gs://` URL (read through `hydra_jax.paths`; TFDS's ArrayRecord files
through a local copy of the split, see `read_tfds`). The CIFAR and SVHN sub-folders are also found under the
reference's `CIFAR10/`, `CIFAR100/` and `SVHN/` roots.
`data.format='auto'` picks the one format whose files `data_dir` holds (TFDS's default directory when
`data_dir` is empty); when it holds a dataset in two formats, `data.format` must choose.

What each reader yields is what torchvision's loader yields, as uint8 [H, W, 3] images and int labels:
- CIFAR pickles (trusted files only: unpickling runs code): `data` rows are uint8 [3072] in channel-major
  (C, H, W) order; `labels` (CIFAR-10) or `fine_labels` (CIFAR-100); train batches in file order.
- SVHN .mat (read with `scipy.io.loadmat`): `X` uint8 [32, 32, 3, N], `y` [N, 1] in 1..10, where 10 is the
  digit 0 and becomes label 0 (torchvision and TFDS do the same).
- Image folders: class index = position of the class folder's name in the sorted list of names; images are
  every file with one of torchvision's image extensions, ordered by class then sorted path, decoded with
  Pillow and converted to RGB one at a time when a batch asks for them (never the whole split in memory).
  ImageNet's `validation` split is the folder `val/`, with the same class folders as `train/`.

Usage:

  fmt, root = data_formats.resolve("auto", "cifar10", "/data")   # ("cifar_pickle", "/data/cifar-10-batches-py")
  source = data_formats.load(fmt, root, "cifar10", "train")       # 50000 examples
  source[7]                                                      # {"image": uint8 [32, 32, 3], "label": 6}
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NoReturn

import numpy as np
from absl import logging as absl_logging
from PIL import Image

from hydra_jax import errors
from hydra_jax import paths

# torchvision's IMG_EXTENSIONS (matched case-insensitively, as ImageFolder does).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CIFAR = {
  "cifar10": {
    "folder": "cifar-10-batches-py",
    "label_key": "labels",
    "files": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
  },
  "cifar100": {
    "folder": "cifar-100-python",
    "label_key": "fine_labels",
    "files": {"train": ("train",), "test": ("test",)},
  },
}
_CIFAR_ROOTS = ("", "CIFAR10", "CIFAR100")  # the reference keeps both under CIFAR10/ (data/cifar.py)
_SVHN_ROOTS = ("", "SVHN")
_FOLDER_SPLITS = {"train": "train", "validation": "val"}


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """In-memory random-access examples.

  Attributes:
    images: [N, H, W, C], uint8 in 0..255 or float32 in [0, 1].
    labels: int [N].
  """

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolderSource:
  """Image files decoded on access (picklable, for grain's worker processes).

  Attributes:
    paths: the image files, in example order.
    labels: int32 [N], class index of each file.
    classes: class folder names; `classes[label]` is the folder of an example.
  """

  paths: tuple[str, ...]
  labels: np.ndarray
  classes: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Returns {"image": uint8 [H, W, 3] (`decode(index)` as an array), "label": int}."""
    return {"image": np.asarray(self.decode(index)), "label": int(self.labels[index])}

  def decode(self, index: int) -> Image.Image:
    """The RGB Pillow image of example `index`: torchvision's loader's image (Pillow's decode, converted to RGB).

    An image already RGB is returned as decoded: `convert("RGB")` would only copy it.
    """
    with paths.path(self.paths[index]).open("rb") as file, Image.open(file) as image:
      image.load()
      return image if image.mode == "RGB" else image.convert("RGB")


def _join(location: str, *parts: str) -> str:
  """`location`/`parts`, normalised for a local path (a URL is joined as it is, never turned into 'gs:/')."""
  joined = paths.join(location, *parts)
  return joined if paths.is_remote(joined) else os.path.normpath(joined)


def _is_file(location: str) -> bool:
  return paths.path(location).is_file()


def _is_dir(location: str) -> bool:
  return paths.path(location).is_dir()


# -------------------------------------------------------------------------------------------- CIFAR pickles


def find_cifar_pickles(data_dir: str, dataset: str) -> str | None:
  """The folder under `data_dir` holding any of `dataset`'s torchvision pickle files, or None.

  Args:
    data_dir: folder to search: itself, its `cifar-10-batches-py/` (or `cifar-100-python/`), and that
      sub-folder under the reference's `CIFAR10/` and `CIFAR100/`.
    dataset: "cifar10" or "cifar100".
  """
  spec = _CIFAR[dataset]
  names = [name for files in spec["files"].values() for name in files]
  for root in _CIFAR_ROOTS:
    for folder in (_join(data_dir, root), _join(data_dir, root, spec["folder"])):
      if any(_is_file(_join(folder, name)) for name in names):
        return folder
  return None


def _unpickle(path: str) -> dict[str, Any]:
  """A CIFAR batch file as a dict with str keys (the files hold Python 2 str keys, read here as bytes)."""
  try:
    with paths.path(path).open("rb") as f:
      content = pickle.load(f, encoding="latin1")  # latin1 as torchvision: Python 2 numpy arrays need it
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
    raise errors.DataError(
      f"{path} is not a CIFAR python pickle ({error}); use the files of the 'python version' "
      "archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz), as torchvision does"
    ) from error
  if not isinstance(content, dict):
    raise errors.DataError(f"{path} holds a {type(content).__name__}, not a CIFAR batch dict")
  return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _cifar_file(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, 32, 32, 3] and labels int32 [N] of one CIFAR batch file."""
  content = _unpickle(path)
  missing = {"data", label_key} - set(content)
  if missing:
    raise errors.DataError(f"{path} lacks the keys {sorted(missing)}; is it a file of the other CIFAR dataset?")
  rows, labels = np.asarray(content["data"]), np.asarray(content[label_key])
  if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32 or labels.shape != rows.shape[:1]:
    raise errors.DataError(
      f"{path}: 'data' must be uint8 [N, 3072] with N '{label_key}', got {rows.dtype} "
      f"{rows.shape} and {labels.shape[0] if labels.ndim else 'no'} labels"
    )
  images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are channel-major: (C, H, W)
  return images, labels.astype(np.int32)


def read_cifar_pickles(root: str, dataset: str, split: str) -> ArraySource:
  """One split of CIFAR-10/100 from torchvision's pickle files.

  Args:
    root: the folder holding the files (`find_cifar_pickles`).
    dataset: "cifar10" or "cifar100".
    split: "train" (CIFAR-10: data_batch_1..5 in order) or "test".

  Returns:
    ArraySource of images uint8 [N, 32, 32, 3] (HWC) and labels int32 [N] (CIFAR-100: fine labels).
  """
  spec = _CIFAR[dataset]
  files = [_join(root, name) for name in spec["files"][split]]
  absent = [os.path.basename(file) for file in files if not _is_file(file)]
  if absent:
    raise errors.MissingDataError(
      f"{dataset} split {split!r} needs {absent} in {root}, which lacks them; extract the whole "
      f"{spec['folder']} archive there"
    )
  parts = [_cifar_file(file, spec["label_key"]) for file in files]
  return ArraySource(np.ascontiguousarray(np.concatenate([p[0] for p in parts])), np.concatenate([p[1] for p in parts]))


# ----------------------------------------------------------------------------------------------- SVHN .mat


def find_svhn_mat(data_dir: str, dataset: str) -> str | None:
  """The folder (`data_dir` or its `SVHN/`) holding any `*_32x32.mat` file of SVHN, or None."""
  del dataset  # svhn_cropped only
  for root in _SVHN_ROOTS:
    folder = _join(data_dir, root)
    if any(_is_file(_join(folder, f"{split}_32x32.mat")) for split in ("train", "test", "extra")):
      return folder
  return None


def read_svhn_mat(root: str, dataset: str, split: str) -> ArraySource:
  """One split of SVHN (cropped digits) from its `{split}_32x32.mat` file.

  Args:
    root: the folder holding the file (`find_svhn_mat`).
    dataset: "svhn_cropped".
    split: "train", "test" or "extra".

  Returns:
    ArraySource of images uint8 [N, 32, 32, 3] and labels int32 [N] in 0..9 (the file's 10 is digit 0).
  """
  import scipy.io  # pylint: disable=g-import-not-at-top  # only SVHN users pay its import

  path = _join(root, f"{split}_32x32.mat")
  if not _is_file(path):
    raise errors.MissingDataError(
      f"{dataset} split {split!r} needs {path}, which does not exist; put SVHN's "
      f"{split}_32x32.mat (http://ufldl.stanford.edu/housenumbers/) there"
    )
  try:
    with paths.path(path).open("rb") as f:
      content = scipy.io.loadmat(f)
  except (scipy.io.matlab.MatReadError, ValueError, TypeError, NotImplementedError, OSError) as error:
    raise errors.DataError(f"{path} is not a MATLAB (v5) file as SVHN distributes it ({error})") from error
  if "X" not in content or "y" not in content:
    raise errors.DataError(f"{path} lacks the variables 'X' and 'y' of SVHN's cropped-digit files")
  images, labels = content["X"], content["y"].reshape(-1).astype(np.int32)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3) or len(labels) != images.shape[3]:
    raise errors.DataError(
      f"{path}: X must be uint8 [32, 32, 3, N] and y [N, 1], got {images.dtype} {images.shape} and {len(labels)} labels"
    )
  if labels.size and (labels.min() < 1 or labels.max() > 10):
    raise errors.DataError(f"{path}: y must hold the digits 1..10 (10 for 0), got {labels.min()}..{labels.max()}")
  return ArraySource(np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels % 10)


# -------------------------------------------------------------------------------------------- image folders


def find_image_folder(data_dir: str, dataset: str) -> str | None:
  """`data_dir` if it has a `train/` or `val/` folder (ImageNet as class-per-folder JPEGs), else None."""
  del dataset  # imagenet2012 only
  has_split = any(_is_dir(_join(data_dir, folder)) for folder in _FOLDER_SPLITS.values())
  return _join(data_dir) if has_split else None


def _class_folders(folder: str) -> list[str]:
  """Sorted names of the sub-folders of `folder`; raises ValueError when there are none."""
  if not _is_dir(folder):
    raise errors.MissingDataError(f"{folder} does not exist: it must hold one sub-folder of images per class")
  entries = list(paths.path(folder).iterdir())
  classes = sorted(entry.name for entry in entries if entry.is_dir())
  if not classes:
    loose = sum(entry.name.lower().endswith(IMAGE_EXTENSIONS) for entry in entries)
    raise errors.DataError(
      f"{folder} has no class folders ({loose} image files lie directly in it); sort the images into "
      "one sub-folder per class (e.g. ImageNet's val/ by its ground-truth labels), as torchvision's "
      "ImageFolder expects"
    )
  return classes


def _images_under(folder: str) -> list[str]:
  """Image files under `folder` (recursively, following links), in sorted walk order, as ImageFolder lists them."""
  walk = _remote_walk(folder) if paths.is_remote(folder) else os.walk(folder, followlinks=True)
  return [
    _join(path, name)
    for path, _, names in sorted(walk)
    for name in sorted(names)
    if name.lower().endswith(IMAGE_EXTENSIONS)
  ]


def _remote_walk(folder: str) -> list[tuple[str, list[str], list[str]]]:
  """`os.walk`'s (folder, sub-folder names, file names) triples for a URL folder, listed through `paths`."""
  entries = list(paths.path(folder).iterdir())
  folders = [entry.name for entry in entries if entry.is_dir()]
  files = [entry.name for entry in entries if entry.name not in folders]
  return [(folder, folders, files)] + [triple for name in folders for triple in _remote_walk(_join(folder, name))]


def read_image_folder(root: str, dataset: str, split: str) -> ImageFolderSource:
  """One split of a class-per-folder image tree (torchvision's ImageFolder), listed but not decoded.

  Args:
    root: the folder holding `train/` and `val/` (`find_image_folder`).
    dataset: "imagenet2012".
    split: "train" (folder train/) or "validation" (folder val/).

  Returns:
    ImageFolderSource; its labels are positions of the class folders in their sorted names.
  """
  folder = _join(root, _FOLDER_SPLITS[split])
  classes = _class_folders(folder)
  for other in _FOLDER_SPLITS.values():
    other_folder = _join(root, other)
    if other_folder != folder and _is_dir(other_folder) and _class_folders(other_folder) != classes:
      raise errors.DataError(
        f"{folder} and {other_folder} have different class folders, so their labels would not "
        f"agree; {dataset} needs the same class names in both"
      )
  per_class = [_images_under(_join(folder, name)) for name in classes]
  empty = [name for name, paths in zip(classes, per_class) if not paths]
  if empty:
    raise errors.DataError(
      f"class folders without images in {folder}: {empty[:5]}{' ...' if len(empty) > 5 else ''}; "
      f"add their images (extensions {', '.join(IMAGE_EXTENSIONS)}) or remove the folders"
    )
  labels = np.concatenate([np.full(len(paths), label, np.int32) for label, paths in enumerate(per_class)])
  return ImageFolderSource(tuple(path for paths in per_class for path in paths), labels, tuple(classes))


# --------------------------------------------------------------------------------------------------- TFDS


def find_tfds(data_dir: str, dataset: str) -> str | None:
  """`data_dir` if it has a TFDS folder `<dataset>/`, else None."""
  return _join(data_dir) if _is_dir(_join(data_dir, dataset)) else None


def _tfds_hint(dataset: str, data_dir: str | None) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return f"`tfds build {dataset} --file_format=array_record --data_dir={where}` (once, with internet and TensorFlow)"


def read_tfds(root: str | None, dataset: str, split: str) -> Sequence[Any]:
  """One split of a TFDS dataset prepared in ArrayRecord format (`tfds.data_source`; TensorFlow not needed).

  From a URL (`gs://...`), the split's files are read from a copy in the local cache (`_tfds_local_copy`):
  ArrayRecord's reader opens its files in C++, which reads local paths only.

  Args:
    root: TFDS data directory, local or a URL (None: TFDS's default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    dataset: TFDS builder name, e.g. "cifar10".
    split: TFDS split name.

  Returns:
    The random-access `tfds.data_source` of the split.
  """
  # Imported here: TFDS takes ~2 s to import and the offline default does not need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    data_dir = _tfds_local_copy(root, dataset, split) if root and paths.is_remote(root) else root
    with _absl_errors_only():  # TFDS warns of each folder it finds unprepared: the error below says it in one line
      return tfds.data_source(
        dataset, split=split, data_dir=data_dir, download=False, builder_kwargs={"file_format": "array_record"}
      )
  except (KeyError, FileNotFoundError, AssertionError) as error:
    raise errors.MissingDataError(
      f"TFDS dataset {dataset!r} (split {split!r}) is not prepared in ArrayRecord format under "
      f"data_dir={root or '(TFDS default)'!r}. Prepare it with {_tfds_hint(dataset, root)}, or "
      "point data.data_dir at the files you have (see data.format)"
    ) from error


@contextlib.contextmanager
def _absl_errors_only():
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def _tfds_local_copy(root: str, dataset: str, split: str) -> str:
  """A local TFDS data directory holding the copy of `<root>/<dataset>/<version>/` that `split` reads.

  The version is the one TFDS reads (the builder's); the copy holds the split's shards and every file that is
  not a shard (dataset_info.json, features.json, label files), not the other splits' shards.

  Raises:
    FileNotFoundError: `root` has no folder of that version (nothing is copied).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  folder = _join(root, dataset, str(tfds.builder_cls(dataset).VERSION))
  if not _is_dir(folder):
    raise FileNotFoundError(folder)
  # Shards are named `<dataset>-<split>.<file format>-<index>-of-<count>` (TFDS's naming).
  shard = re.compile(rf"{re.escape(dataset)}-(?P<split>.+)\.\w+-\d{{5}}-of-\d{{5}}")
  names = [
    file.name
    for file in paths.path(folder).iterdir()
    if file.is_file() and ((match := shard.fullmatch(file.name)) is None or match["split"] == split)
  ]
  paths.cached_copy(folder, names)
  return paths.cache_path(root)


# ----------------------------------------------------------------------------------------------- registry

FORMATS: dict[str, dict[str, Any]] = {
  "tfds": {
    "datasets": ("mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012"),
    "find": find_tfds,
    "read": read_tfds,
    "files": "a TFDS folder {dataset}/ of ArrayRecord files",
  },
  "cifar_pickle": {
    "datasets": ("cifar10", "cifar100"),
    "find": find_cifar_pickles,
    "read": read_cifar_pickles,
    "files": "torchvision's cifar-10-batches-py/ or cifar-100-python/ pickle files",
  },
  "svhn_mat": {
    "datasets": ("svhn_cropped",),
    "find": find_svhn_mat,
    "read": read_svhn_mat,
    "files": "SVHN's train_32x32.mat / test_32x32.mat",
  },
  "image_folder": {
    "datasets": ("imagenet2012",),
    "find": find_image_folder,
    "read": read_image_folder,
    "files": "folders train/<class>/ and val/<class>/ of images",
  },
}


def get_format(name: str) -> dict[str, Any]:
  """The registry entry of format `name`: its datasets, `find(data_dir, dataset)`, `read(root, dataset, split)`
  and a description of its files; raises ValueError listing the valid names (and 'auto')."""
  if name not in FORMATS:
    raise ValueError(f"Unknown data format {name!r}; valid: auto, {', '.join(FORMATS)}")
  return FORMATS[name]


def formats_of(dataset: str) -> list[str]:
  """Names of the formats that can hold `dataset`, in registry order."""
  return [name for name, entry in FORMATS.items() if dataset in entry["datasets"]]


def resolve(data_format: str, dataset: str, data_dir: str | None) -> tuple[str, str | None]:
  """The format to read `dataset` from and the folder holding its files.

  Args:
    data_format: "auto" (the one format whose files `data_dir` holds; TFDS when `data_dir` is empty) or a
      `FORMATS` name.
    dataset: a dataset name of `hydra_jax.data` (not "digits", which is built in).
    data_dir: the folder given by the user, or None.

  Returns:
    (format name, root): `root` is what the format's `read` takes (None only for TFDS's default directory).

  Raises:
    ValueError: unknown format, a format that cannot hold `dataset`, no files found, or `data_dir` holding
      `dataset` in several formats.
  """
  if data_format != "auto":
    entry = get_format(data_format)
    if dataset not in entry["datasets"]:
      raise errors.DataError(
        f"data.format={data_format!r} cannot hold {dataset!r}; valid for {dataset}: "
        f"auto, {', '.join(formats_of(dataset))}"
      )
    if data_format == "tfds":
      return "tfds", data_dir or None  # TFDS names what is missing itself
    root = entry["find"](data_dir, dataset) if data_dir else None
    if root is None:
      _not_found(dataset, data_dir, [data_format])
    return data_format, root
  if not data_dir:
    return "tfds", None
  if not _is_dir(data_dir):
    raise errors.MissingDataError(
      f"data_dir={data_dir!r} is not a folder; point data.data_dir at the folder holding {dataset}"
    )
  found = {name: root for name in formats_of(dataset) if (root := FORMATS[name]["find"](data_dir, dataset))}
  if len(found) > 1:
    places = "; ".join(f"{name} in {root}" for name, root in found.items())
    raise errors.DataError(
      f"data_dir={data_dir!r} holds {dataset} in several formats ({places}); choose one with "
      f"data.format={' or '.join(found)}"
    )
  if not found:
    _not_found(dataset, data_dir, formats_of(dataset))
  return next(iter(found.items()))


def _not_found(dataset: str, data_dir: str | None, formats: list[str]) -> NoReturn:
  """Raises the ValueError for `dataset` absent from `data_dir` in every one of `formats`."""
  looked = "; ".join(f"{name}: {FORMATS[name]['files'].format(dataset=dataset)}" for name in formats)
  hint = f" To build the TFDS files: {_tfds_hint(dataset, data_dir)}." if "tfds" in formats else ""
  raise errors.MissingDataError(
    f"no {dataset} files in data_dir={data_dir or ''!r}; looked for {looked}. Point data.data_dir "
    f"at the folder holding them.{hint}"
  )


def load(data_format: str, root: str | None, dataset: str, split: str) -> Sequence[Any]:
  """Random-access examples {"image": uint8 [H, W, C], "label": int} of one split (see the module docstring).

  Args:
    data_format, root: as returned by `resolve`.
    dataset: dataset name.
    split: split name of `hydra_jax.data`'s registry ("train", "test", "validation", "extra").
  """
  read: Callable[[str | None, str, str], Sequence[Any]] = get_format(data_format)["read"]
  return read(root, dataset, split)
