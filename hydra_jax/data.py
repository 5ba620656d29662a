"""Deterministic, resumable input pipelines over scikit-learn's `digits` and files on disk.

Every batch is a pure function of (seed, step): the sample order (a fresh permutation each
epoch) and the augmentation draws depend on nothing else, so a run restarted at step `s`
sees exactly the batches an uninterrupted run would have seen from `s`. Batches are numpy
dicts `{'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}`; no normalisation.

Datasets (`get_dataset_info(name)` lists sizes; train augmentation as in HYDRA's code):

| name           | image     | train augmentation                                  | eval split |
|----------------|-----------|-----------------------------------------------------|------------|
| `digits`       | 8x8x1     | 1-pixel zero pad + random 8x8 crop (no flip)        | test       |
| `mnist`        | 28x28x1   | none (HYDRA has no working MNIST loader)            | test       |
| `cifar10`      | 32x32x3   | 4-pixel zero pad + random 32x32 crop + h-flip       | test       |
| `cifar100`     | 32x32x3   | same as cifar10 (fine labels)                       | test       |
| `svhn_cropped` | 32x32x3   | same as cifar10, flip included as in HYDRA          | test       |
| `imagenet2012` | 224x224x3 | random resized crop (0.08-1, 3/4-4/3) + h-flip;     | validation |
|                |           | eval: resize shorter side to 256 + center crop 224  |            |

`digits` (1797 images, shipped with scikit-learn: no download) is split by a stratified
80/20 split with a fixed seed into 1437 train / 360 test images; pixel values 0..16 are
divided by 16. The other datasets are read from files under `data_dir`, in the format
`data_format` names or ('auto') the one whose files are there (`hydra_jax.data_formats`):
TFDS ArrayRecord files (read with `tfds.data_source`, no TensorFlow needed), torchvision's
CIFAR pickles, SVHN's .mat files, or ImageNet as class-per-folder JPEGs. Nothing is ever
downloaded here. Whatever the format, the batches below are the same functions of (seed, step).
ImageNet images are cropped, resized and flipped on uint8 exactly as torchvision's transforms do on a
Pillow image (`random_resized_crop`, `resize_center_crop`: the same Pillow calls, so the same bytes), then
divided by 255 as its `ToTensor`; image folders hand Pillow's decode over without a copy through numpy.

Train batches: `batch_size` is the global batch; host `process_index` of `process_count`
reads only its contiguous slice of `batch_size // process_count` examples. The global batch
(and its augmentation) is the same for any number of hosts. An epoch is
`len(train) // batch_size` steps; the last `len(train) % batch_size` examples of each
epoch's permutation are skipped that epoch. With `semisup_path` (HYDRA's `--is-semisup`),
each host batch is the labelled batch followed by an equally large batch of pseudo-labelled
extra images (so 2x the rows, as in HYDRA), augmented like the training set and drawn
from their own per-epoch permutation: the extra set cycles through its own epochs, while
HYDRA ended each epoch with the shorter of the two loaders. Orders come from numpy's
`Generator.permutation`, so resuming needs the same numpy version (NEP 19).

Eval batches go through a split in order, once, with a fixed batch shape: the last batch is
zero-padded and `'mask'` (float32 [B], 1 for real examples) marks the real rows, so
`sum(mask * correct)` over all hosts and steps counts every example exactly once.

Usage:

  info = data.get_dataset_info('cifar10')
  train = data.train_batches('cifar10', batch_size=128, seed=0, data_dir='/data')  # any format
  for step, batch in zip(range(start, total), data.iterate(train, range(start, total))):
    ...                                   # batch['image']: [128, 32, 32, 3] float32
  test = data.eval_batches('cifar10', batch_size=256)
  for batch in data.iterate(test, range(test.num_steps)):
    ...                                   # batch['mask'] marks the real rows
  train.batch_at(1234)                    # random access to the batch of step 1234
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pickle
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from hydra_jax import data_formats
from hydra_jax import errors
from hydra_jax import paths
from hydra_jax.data_formats import ArraySource

Batch = dict[str, np.ndarray]

# Stream tags: independent random streams derived from one seed.
_SHUFFLE, _AUGMENT, _SUBSET, _SEMI_SHUFFLE, _SEMI_AUGMENT, _SEMI_SUBSET = range(6)
# torchvision RandomResizedCrop defaults (area fraction, aspect ratio) and attempts.
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_IMAGENET_RESIZE, _IMAGENET_CROP = 256, 224


class DatasetInfo(NamedTuple):
  """Static facts about a dataset.

  Attributes:
    name: registry name.
    num_classes: number of labels.
    image_shape: (H, W, C) of the images this module yields at the default `image_size`.
    split_sizes: number of examples per split.
    train_split: split used by `train_batches`.
    eval_split: default split of `eval_batches`.
    pad: zero padding (pixels) before the random crop of training images; 0 = no crop.
    flip: whether training images are flipped horizontally with probability 1/2.
    variable_size: images differ in size: training uses a random resized crop and
      evaluation a resize + center crop (ImageNet) instead of pad + crop.
    tfds_name: TFDS builder name, or None for in-memory datasets.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  split_sizes: Mapping[str, int]
  train_split: str
  eval_split: str
  pad: int
  flip: bool
  variable_size: bool
  tfds_name: str | None


_DATASETS = {
  "digits": DatasetInfo(
    "digits",
    10,
    (8, 8, 1),
    {"train": 1437, "test": 360},
    "train",
    "test",
    pad=1,
    flip=False,
    variable_size=False,
    tfds_name=None,
  ),
  "mnist": DatasetInfo(
    "mnist",
    10,
    (28, 28, 1),
    {"train": 60000, "test": 10000},
    "train",
    "test",
    pad=0,
    flip=False,
    variable_size=False,
    tfds_name="mnist",
  ),
  "cifar10": DatasetInfo(
    "cifar10",
    10,
    (32, 32, 3),
    {"train": 50000, "test": 10000},
    "train",
    "test",
    pad=4,
    flip=True,
    variable_size=False,
    tfds_name="cifar10",
  ),
  "cifar100": DatasetInfo(
    "cifar100",
    100,
    (32, 32, 3),
    {"train": 50000, "test": 10000},
    "train",
    "test",
    pad=4,
    flip=True,
    variable_size=False,
    tfds_name="cifar100",
  ),
  "svhn_cropped": DatasetInfo(
    "svhn_cropped",
    10,
    (32, 32, 3),
    {"train": 73257, "test": 26032, "extra": 531131},
    "train",
    "test",
    pad=4,
    flip=True,
    variable_size=False,
    tfds_name="svhn_cropped",
  ),
  "imagenet2012": DatasetInfo(
    "imagenet2012",
    1000,
    (224, 224, 3),
    {"train": 1281167, "validation": 50000},
    "train",
    "validation",
    pad=0,
    flip=True,
    variable_size=True,
    tfds_name="imagenet2012",
  ),
}


def get_dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`; raises ValueError listing the valid names."""
  if name not in _DATASETS:
    raise errors.DataError(f"Unknown dataset {name!r}; valid names: {sorted(_DATASETS)}.")
  return _DATASETS[name]


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, ArraySource]:
  # Imported here: scikit-learn takes ~3 s to import and only `digits` needs it.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = model_selection.train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
  return {
    split: ArraySource(images[np.sort(idx)], labels[np.sort(idx)]) for split, idx in (("train", train), ("test", test))
  }


def load_source(name: str, split: str, data_dir: str | None = None, data_format: str = "auto") -> Sequence[Any]:
  """Random-access examples `{'image': [H, W, C], 'label': int}` of one split.

  Args:
    name: registry name (see `get_dataset_info`).
    split: one of `get_dataset_info(name).split_sizes`.
    data_dir: folder holding the dataset's files (see `hydra_jax.data_formats`); None: TFDS's
      default directory (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). Unused for `digits`.
    data_format: 'auto' (detect from the files in `data_dir`) or a `data_formats.FORMATS` name:
      'tfds', 'cifar_pickle', 'svhn_mat', 'image_folder'. `digits` takes only 'auto'.

  Returns:
    An `ArraySource` for `digits`, CIFAR pickles and SVHN .mat files, an `ImageFolderSource`
    (decoding on access) for image folders, else the `tfds.data_source` of the split.

  Raises:
    ValueError: unknown dataset, split or format, or files missing or malformed (the message
      names the file and the fix).
    errors.MissingDataError (a FileNotFoundError): the files are missing or the TFDS dataset is not prepared.
  """
  info = get_dataset_info(name)
  if split not in info.split_sizes:
    raise errors.DataError(f"Unknown split {split!r} of {name!r}; valid splits: {sorted(info.split_sizes)}.")
  if info.tfds_name is None:
    if data_format != "auto":
      raise errors.DataError(
        f"{name!r} ships with scikit-learn and has no files; data.format must be 'auto', got {data_format!r}."
      )
    return _digits_splits()[split]
  data_format, root = data_formats.resolve(data_format, info.tfds_name, data_dir)
  return data_formats.load(data_format, root, info.tfds_name, split)


def _load_semisup(path: str, image_shape: tuple[int, ...], num_classes: int) -> ArraySource:
  """Loads pseudo-labelled images: a pickle (trusted files only) or .npz with `data` and
  `extrapolated_targets`."""
  if not paths.path(path).exists():
    raise errors.MissingDataError(f"semisup_path {path!r} does not exist.")
  with paths.path(path).open("rb") as file:
    if path.endswith(".npz"):
      with np.load(file) as f:
        content = dict(f)
    else:
      content = pickle.load(file)
  missing = {"data", "extrapolated_targets"} - set(content)
  if missing:
    raise errors.DataError(f"semisup file {path!r} lacks keys {sorted(missing)}.")
  images = np.asarray(content["data"])
  labels = np.asarray(content["extrapolated_targets"]).astype(np.int32)
  if images.dtype != np.uint8 or images.shape[1:] != image_shape:
    raise errors.DataError(
      f"semisup data in {path!r} must be uint8 [N, *{image_shape}], got {images.dtype} {images.shape}."
    )
  if labels.shape != images.shape[:1] or labels.min() < 0 or labels.max() >= num_classes:
    raise errors.DataError(
      f"semisup extrapolated_targets in {path!r} must be [N] ints in [0, {num_classes}); got shape {labels.shape}."
    )
  return ArraySource(images, labels)


def _read(source: Sequence[Any], indices: np.ndarray) -> tuple[Any, np.ndarray]:
  """Returns (images: array [B, H, W, C], or a list of [H_i, W_i, C] arrays or RGB Pillow images, labels: int32 [B])."""
  if isinstance(source, ArraySource):
    return source.images[indices], source.labels[indices].astype(np.int32)
  if isinstance(source, data_formats.ImageFolderSource):  # Pillow images: no round trip through numpy
    return [source.decode(int(i)) for i in indices], source.labels[indices].astype(np.int32)
  records = [source[int(i)] for i in indices]
  return [r["image"] for r in records], np.array([r["label"] for r in records], np.int32)


# ------------------------------------------------------------------------ augmentation


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
  """Zero-pads by `pad` pixels, crops back to [H, W] at `offsets`, then flips.

  Args:
    images: [B, H, W, C] any dtype.
    offsets: int [B, 2], (top, left) of each crop in the padded image, in [0, 2 * pad].
    flips: bool [B], reverse the width axis of the crop.
    pad: padding in pixels on each side.

  Returns:
    [B, H, W, C], same dtype: `out[b, i, j] = padded[b, top + i, left + j']` with
    `j' = W - 1 - j` when flipped, else `j`.
  """
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for i, ((top, left), flip) in enumerate(zip(offsets, flips)):
    crop = padded[i, top : top + h, left : left + w]
    out[i] = crop[:, ::-1] if flip else crop
  return out


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
  """`image` as a Pillow image: uint8 [H, W, 3] arrays become RGB images; Pillow images pass through."""
  return image if isinstance(image, Image.Image) else Image.fromarray(image)


def random_resized_crop(image: np.ndarray | Image.Image, uniforms: np.ndarray, flip: bool, size: int) -> np.ndarray:
  """torchvision's `RandomResizedCrop(size)` then `RandomHorizontalFlip()`, on uint8, with the draws given.

  As torchvision does on a Pillow image: `image.crop(box)` (box from `inception_crop_box`), then
  `resize((size, size), BILINEAR)` (Pillow's antialiased bilinear filter, rounding to uint8 after each of its two
  passes, no `reducing_gap`), then `transpose(FLIP_LEFT_RIGHT)` when `flip`. Note that
  `image.resize(..., box=box)` is not the same: its filter reads pixels outside the box at the crop's edges.

  Args:
    image: uint8 [H, W, 3] array or RGB Pillow image.
    uniforms: [attempts, 4] draws in [0, 1) for `inception_crop_box`.
    flip: mirror the output left-right.
    size: output side in pixels.

  Returns:
    uint8 [size, size, 3].
  """
  image = _as_pil(image)
  top, left, h, w = inception_crop_box(image.height, image.width, uniforms)
  out = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)


def inception_crop_box(height: int, width: int, uniforms: np.ndarray) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop` box, with its random draws given explicitly.

  Tries each row of `uniforms` in turn: area fraction in [0.08, 1], log-uniform aspect
  ratio in [3/4, 4/3], uniform position; falls back to the largest central crop with the
  aspect ratio clipped to [3/4, 4/3] when no attempt fits.

  Args:
    height: image height in pixels.
    width: image width in pixels.
    uniforms: [attempts, 4] draws in [0, 1): (area, log-ratio, top, left).

  Returns:
    (top, left, crop_height, crop_width) in pixels.
  """
  log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
  for u_area, u_ratio, u_top, u_left in uniforms:
    area = height * width * (_CROP_SCALE[0] + (_CROP_SCALE[1] - _CROP_SCALE[0]) * u_area)
    aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
  if width / height < _CROP_RATIO[0]:
    w, h = width, round(width / _CROP_RATIO[0])
  elif width / height > _CROP_RATIO[1]:
    w, h = round(height * _CROP_RATIO[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_center_crop(image: np.ndarray | Image.Image, resize_to: int, crop: int) -> np.ndarray:
  """torchvision's `Resize(resize_to)` (shorter side) then `CenterCrop(crop)`, on uint8 as torchvision on Pillow.

  The whole image is resized with Pillow's BILINEAR filter to shorter side `resize_to` and longer side
  `int(resize_to * longer / shorter)`, then cropped at (top, left) = round((new size - crop) / 2).

  Args:
    image: uint8 [H, W, 3] array or RGB Pillow image.
    resize_to: shorter side after resizing, in pixels (>= crop).
    crop: side of the square center crop, in pixels.

  Returns:
    uint8 [crop, crop, 3].
  """
  image = _as_pil(image)
  w, h = image.size
  if h <= w:
    new_h, new_w = resize_to, int(resize_to * w / h)
  else:
    new_h, new_w = int(resize_to * h / w), resize_to
  top, left = round((new_h - crop) / 2), round((new_w - crop) / 2)
  resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  return np.asarray(resized.crop((left, top, left + crop, top + crop)))


def _to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 [0, 1]; float images (already in [0, 1]) -> float32."""
  if images.dtype == np.uint8:
    return np.divide(images, np.float32(255), dtype=np.float32)
  return images.astype(np.float32)


def _upsample(images: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upsampling of [B, H, W, C] by an integer factor."""
  if factor == 1:
    return images
  return images.repeat(factor, axis=1).repeat(factor, axis=2)


# ---------------------------------------------------------------------------- indexing


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, tag: int, epoch: int, n: int) -> np.ndarray:
  """Read-only permutation of range(n), a pure function of its arguments."""
  perm = _rng(seed, tag, epoch).permutation(n)
  perm.flags.writeable = False
  return perm


def _subset(seed: int, tag: int, n: int, fraction: float) -> np.ndarray:
  """Sorted random int(fraction * n) indices of range(n) (all of them for fraction 1)."""
  if not 0.0 < fraction <= 1.0:
    raise errors.DataError(f"Data fractions must be in (0, 1], got {fraction}.")
  if fraction == 1.0:
    return np.arange(n)
  return np.sort(_rng(seed, tag).choice(n, int(fraction * n), replace=False))


def _global_positions(seed: int, tag: int, step: int, n: int, batch: int) -> np.ndarray:
  """Positions in range(n) of the global batch at `step`: slice of the epoch's shuffle."""
  epoch, b = divmod(step, n // batch)
  return _permutation(seed, tag, epoch, n)[b * batch : (b + 1) * batch]


def _host_slice(x: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous `process_index`-th of `process_count` equal parts along axis 0."""
  return x.reshape(process_count, -1, *x.shape[1:])[process_index]


def _hosts(batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise errors.DataError(f"process_index {process_index} not in [0, {process_count}).")
  if batch_size <= 0 or batch_size % process_count:
    raise errors.DataError(
      f"Global batch_size {batch_size} must be a positive multiple of process_count {process_count}."
    )
  return process_index, process_count


def _output_side(info: DatasetInfo, image_size: int | None) -> int:
  """Validated side in pixels of the yielded images (see `train_batches`)."""
  native = info.image_shape[0]
  if image_size is None:
    return native
  if image_size <= 0 or (not info.variable_size and image_size % native):
    raise errors.DataError(
      f"image_size {image_size} of {info.name!r} must be a positive multiple of its native size {native}."
    )
  return image_size


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True, eq=False)
class TrainBatches:
  """Random access to the (infinite) training batch stream of one host.

  Build with `train_batches` (whose arguments document the fields); `indices` are the
  training examples used (sorted source indices) and `image_size` the output side.
  `batch_at(step)` is a pure function of the fields and `step`.
  """

  info: DatasetInfo
  source: Sequence[Any]
  indices: np.ndarray
  batch_size: int
  seed: int
  process_index: int
  process_count: int
  image_size: int
  semisup: ArraySource | None

  @property
  def steps_per_epoch(self) -> int:
    """Steps in one pass over the (subsampled) labelled training set."""
    return len(self.indices) // self.batch_size

  def batch_at(self, step: int) -> Batch:
    """The host's batch of global step `step` (>= 0).

    Returns:
      {'image': float32 [B, S, S, C] in [0, 1], 'label': int32 [B]} with
      B = batch_size // process_count, doubled (labelled rows first) with semisup.
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    pos = _global_positions(self.seed, _SHUFFLE, step, len(self.indices), self.batch_size)
    batch = self._augmented(self.source, self.indices[pos], _rng(self.seed, _AUGMENT, step))
    if self.semisup is None:
      return batch
    pos = _global_positions(self.seed, _SEMI_SHUFFLE, step, len(self.semisup), self.batch_size)
    extra = self._augmented(self.semisup, pos, _rng(self.seed, _SEMI_AUGMENT, step))
    return {k: np.concatenate([batch[k], extra[k]]) for k in batch}

  def _augmented(self, source: Sequence[Any], indices: np.ndarray, rng: np.random.Generator) -> Batch:
    """Reads this host's part of the global `indices` and augments it with `rng`."""
    host = functools.partial(_host_slice, process_index=self.process_index, process_count=self.process_count)
    images, labels = _read(source, host(indices))
    # Draws are made for the whole global batch, so they do not depend on process_count.
    flips = host(rng.random(self.batch_size) < 0.5) & self.info.flip
    if self.info.variable_size:
      uniforms = host(rng.random((self.batch_size, _CROP_ATTEMPTS, 4)))
      crops = [random_resized_crop(*args, self.image_size) for args in zip(images, uniforms, flips)]
      images = _to_unit_float(np.stack(crops))
    else:
      offsets = host(rng.integers(0, 2 * self.info.pad + 1, (self.batch_size, 2)))
      images = pad_crop_flip(np.asarray(images), offsets, flips, self.info.pad)
      images = _upsample(_to_unit_float(images), self.image_size // self.info.image_shape[0])
    return {"image": images, "label": labels}


def train_batches(
  name: str,
  batch_size: int,
  *,
  seed: int = 0,
  data_dir: str | None = None,
  data_format: str = "auto",
  process_index: int | None = None,
  process_count: int | None = None,
  image_size: int | None = None,
  data_fraction: float = 1.0,
  semisup_path: str | None = None,
  semisup_fraction: float = 1.0,
) -> TrainBatches:
  """The training batch stream of this host, shuffled afresh every epoch.

  Args:
    name: registry name (see `get_dataset_info`).
    batch_size: global batch size (all hosts), a multiple of `process_count` and at most
      the number of training examples used.
    seed: seeds the subset, the per-epoch order and the augmentation.
    data_dir: folder of the dataset's files (see `load_source`).
    data_format: 'auto' or a format name (see `load_source`).
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).
    image_size: output side in pixels; for fixed-size datasets an integer multiple of
      the native side (nearest-neighbour upsampling after augmentation), for
      imagenet2012 the crop size (default 224).
    data_fraction: train on a random subset of int(data_fraction * N) examples
      (HYDRA's `--data-fraction`).
    semisup_path: pickle or .npz file with `data` (uint8 [N, H, W, C], the dataset's image
      shape) and `extrapolated_targets` (int [N]), e.g. Carmon et al.'s
      `ti_top_50000_pred_v3.1.pickle`. Each host batch gets as many extra rows.
    semisup_fraction: use a random int(semisup_fraction * N) subset of the extra data
      (HYDRA's `--semisup-fraction`).

  Returns:
    A `TrainBatches`; iterate it with `iterate` or index it with `batch_at(step)`.
  """
  info = get_dataset_info(name)
  process_index, process_count = _hosts(batch_size, process_index, process_count)
  size = _output_side(info, image_size)
  source = load_source(name, info.train_split, data_dir, data_format)
  indices = _subset(seed, _SUBSET, len(source), data_fraction)
  if len(indices) < batch_size:
    raise errors.DataError(f"batch_size {batch_size} exceeds the {len(indices)} training examples used of {name!r}.")
  semisup = None
  if semisup_path is not None:
    semisup = _load_semisup(semisup_path, info.image_shape, info.num_classes)
    keep = _subset(seed, _SEMI_SUBSET, len(semisup), semisup_fraction)
    semisup = ArraySource(semisup.images[keep], semisup.labels[keep])
    if len(semisup) < batch_size:
      raise errors.DataError(
        f"batch_size {batch_size} exceeds the {len(semisup)} semisup examples used from {semisup_path!r}."
      )
  return TrainBatches(info, source, indices, batch_size, seed, process_index, process_count, size, semisup)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalBatches:
  """Random access to one host's in-order, padded batches of an evaluation split.

  Build with `eval_batches`. Global batch `step` holds examples
  [step * batch_size, (step + 1) * batch_size); host p reads its contiguous part.
  """

  info: DatasetInfo
  source: Sequence[Any]
  batch_size: int
  process_index: int
  process_count: int
  image_size: int

  @property
  def num_steps(self) -> int:
    """Steps that cover the split once (the same on every host)."""
    return -(-len(self.source) // self.batch_size)

  def batch_at(self, step: int) -> Batch:
    """The host's part of eval batch `step`, in [0, num_steps).

    Returns:
      {'image': float32 [B, S, S, C] in [0, 1], 'label': int32 [B],
       'mask': float32 [B] (1 = real example, 0 = zero padding)}, B = batch_size //
      process_count.
    """
    if not 0 <= step < self.num_steps:
      raise ValueError(f"Eval step {step} not in [0, {self.num_steps}).")
    pos = _host_slice(step * self.batch_size + np.arange(self.batch_size), self.process_index, self.process_count)
    real = pos < len(self.source)
    images, labels = _read(self.source, pos[real])
    side = self.image_size
    out = {
      "image": np.zeros((len(pos), side, side, self.info.image_shape[2]), np.float32),
      "label": np.zeros(len(pos), np.int32),
      "mask": real.astype(np.float32),
    }
    if real.any():
      out["image"][real] = self._transform(images)
      out["label"][real] = labels
    return out

  def _transform(self, images: Any) -> np.ndarray:
    if self.info.variable_size:
      resize_to = round(self.image_size * _IMAGENET_RESIZE / _IMAGENET_CROP)
      return _to_unit_float(np.stack([resize_center_crop(im, resize_to, self.image_size) for im in images]))
    return _upsample(_to_unit_float(np.asarray(images)), self.image_size // self.info.image_shape[0])


def eval_batches(
  name: str,
  batch_size: int,
  *,
  split: str | None = None,
  data_dir: str | None = None,
  data_format: str = "auto",
  process_index: int | None = None,
  process_count: int | None = None,
  image_size: int | None = None,
) -> EvalBatches:
  """In-order, unaugmented, zero-padded batches covering a split exactly once.

  Args:
    name: registry name (see `get_dataset_info`).
    batch_size: global batch size, a multiple of `process_count`.
    split: default `get_dataset_info(name).eval_split`.
    data_dir, data_format, process_index, process_count, image_size: as in `train_batches`
      (imagenet2012: shorter side resized to round(image_size * 256 / 224)).

  Returns:
    An `EvalBatches`; iterate it with `iterate(batches, range(batches.num_steps))`.
  """
  info = get_dataset_info(name)
  process_index, process_count = _hosts(batch_size, process_index, process_count)
  size = _output_side(info, image_size)
  source = load_source(name, split or info.eval_split, data_dir, data_format)
  return EvalBatches(info, source, batch_size, process_index, process_count, size)


def first_examples(batches: EvalBatches, n: int) -> EvalBatches:
  """The same batches restricted to the first `n` examples of the split (the rest become padding).

  Args:
    batches: from `eval_batches`.
    n: examples to keep; 0 (or at least the split's size) keeps the whole split.

  Returns:
    An `EvalBatches` with ceil(n / batch_size) steps whose rows past example n have mask 0.
  """
  if not 0 < n < len(batches.source):
    return batches
  return dataclasses.replace(batches, source=_Prefix(batches.source, n))


@dataclasses.dataclass(frozen=True)
class _Prefix(Sequence):
  """The first `n` examples of a random-access source."""

  source: Sequence[Any]
  n: int

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]


def iterate(
  batches: TrainBatches | EvalBatches, steps: range, *, prefetch: int = 2, worker_count: int = 0
) -> Iterator[Batch]:
  """Yields `batches.batch_at(step)` for each step of `steps`, in order, via grain.

  Args:
    batches: from `train_batches` or `eval_batches`.
    steps: the global steps to produce, e.g. `range(start_step, num_train_steps)` to resume.
    prefetch: batches computed ahead by as many background threads (0: synchronous).
    worker_count: grain worker processes (0: none). Workers help for ImageNet decoding
      and cropping; they start slowly (each re-imports the program) and need `batches`
      to be picklable.

  Returns:
    An iterator over the batches, identical whatever `prefetch` and `worker_count`.
  """
  dataset = grain.MapDataset.range(steps.start, steps.stop, steps.step).map(batches.batch_at)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  if worker_count:
    # grain reads its absl flags in the workers; without absl.app nothing parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(dataset)
