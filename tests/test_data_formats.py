"""Tests of hydra_jax.data_formats: the readers of the files users already have, and format selection.

Every test writes tiny files in the exact formats of the real ones (pickled dicts with bytes keys as in
torchvision's CIFAR archives, MATLAB files with scipy.io.savemat as SVHN's, JPEG trees written with Pillow,
TFDS ArrayRecord files written by TFDS's own cifar10 builder from a few generated examples) and checks what
the readers and the batch pipeline give against what it wrote.
"""

import dataclasses
import io
import os
import pickle

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import data_formats
from hydra_jax import train

HOST = {"process_index": 0, "process_count": 1}


def _cifar_rows(rng, n):
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _pickle(path, content):
  with open(path, "wb") as f:
    pickle.dump(content, f, protocol=2)  # the real files are Python 2 cPickle files, protocol 2


def _write_cifar10(folder, per_batch=3, test=5, seed=0):
  """torchvision's cifar-10-batches-py with `per_batch` rows per training batch; returns (rows, labels) per split."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  written = {"train": ([], []), "test": ([], [])}
  names = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
  for name, split in names:
    n = per_batch if split == "train" else test
    rows, labels = _cifar_rows(rng, n), [int(v) for v in rng.integers(0, 10, n)]
    _pickle(
      os.path.join(folder, name),
      {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
      },
    )
    written[split][0].append(rows)
    written[split][1].extend(labels)
  _pickle(os.path.join(folder, "batches.meta"), {b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
  return {split: (np.concatenate(rows), np.array(labels)) for split, (rows, labels) in written.items()}


def _pixel(rows, n, i, j, c):
  """Pixel (i, j, c) of image n as the CIFAR page defines a row: 1024 red, then green, then blue values."""
  return rows[n, c * 1024 + i * 32 + j]


# ------------------------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_pickles_give_every_pixel_and_label_in_file_order(tmp_path):
  written = _write_cifar10(tmp_path / "cifar-10-batches-py")
  for split, n in (("train", 15), ("test", 5)):
    source = data.load_source("cifar10", split, data_dir=str(tmp_path))
    rows, labels = written[split]
    assert len(source) == n and source.images.shape == (n, 32, 32, 3) and source.images.dtype == np.uint8
    expected = np.array(
      [[[[_pixel(rows, b, i, j, c) for c in range(3)] for j in range(32)] for i in range(32)] for b in range(n)]
    )
    np.testing.assert_array_equal(source.images, expected)
    np.testing.assert_array_equal(source.labels, labels)


def test_cifar100_pickles_use_the_fine_labels(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  for split, n in (("train", 6), ("test", 4)):
    rows = _cifar_rows(rng, n)
    fine, coarse = [int(v) for v in rng.integers(0, 100, n)], [int(v) for v in rng.integers(0, 20, n)]
    content = {
      b"filenames": [b"x"] * n,
      b"batch_label": b"b",
      b"fine_labels": fine,
      b"coarse_labels": coarse,
      b"data": rows,
    }
    if split == "test":  # str keys, as a file re-saved from torchvision's latin1-decoded dict would hold
      content = {key.decode(): value for key, value in content.items()}
    _pickle(folder / split, content)
    source = data.load_source("cifar100", split, data_dir=str(tmp_path))
    np.testing.assert_array_equal(source.labels, fine)
    assert source.images[n - 1, 31, 0, 2] == rows[n - 1, 2048 + 31 * 32]


def test_cifar_folder_is_found_as_torchvision_and_the_reference_lay_it_out(tmp_path):
  # data_dir may be the folder itself, torchvision's root, or the reference's data_dir (root = data_dir/CIFAR10).
  folder = tmp_path / "CIFAR10" / "cifar-10-batches-py"
  _write_cifar10(folder)
  for data_dir in (folder, tmp_path / "CIFAR10", tmp_path):
    assert data_formats.resolve("auto", "cifar10", str(data_dir)) == ("cifar_pickle", str(folder))
  assert data_formats.find_cifar_pickles(str(tmp_path), "cifar100") is None


def test_cifar_train_batches_are_the_pipelines_batches_of_the_written_images(tmp_path):
  written = _write_cifar10(tmp_path, per_batch=4)
  rows, labels = written["train"]
  images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  batches = data.train_batches("cifar10", 6, seed=3, data_dir=str(tmp_path), data_format="cifar_pickle", **HOST)
  assert batches.steps_per_epoch == 20 // 6
  reference = dataclasses.replace(batches, source=data.ArraySource(images, labels))
  again = data.train_batches("cifar10", 6, seed=3, data_dir=str(tmp_path), **HOST)
  hosts = [
    data.train_batches("cifar10", 6, seed=3, data_dir=str(tmp_path), process_index=p, process_count=2) for p in range(2)
  ]
  for step in (0, 4, 7):
    batch = batches.batch_at(step)
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], reference.batch_at(step)[key])
      np.testing.assert_array_equal(batch[key], again.batch_at(step)[key])
      np.testing.assert_array_equal(batch[key], np.concatenate([h.batch_at(step)[key] for h in hosts]))
  # The same stream with each example's index as its label: an epoch (3 steps of 6 of the 20) draws 18 distinct
  # examples, the next epoch a new order of them, and each batch's labels are the written labels of those examples.
  numbered = dataclasses.replace(batches, source=data.ArraySource(images, np.arange(20)))
  epochs = [np.concatenate([numbered.batch_at(s)["label"] for s in range(3 * e, 3 * e + 3)]) for e in range(2)]
  assert all(len(set(epoch)) == 18 and set(epoch) <= set(range(20)) for epoch in epochs)
  assert list(epochs[0]) != list(epochs[1])
  np.testing.assert_array_equal(np.concatenate([batches.batch_at(s)["label"] for s in range(3)]), labels[epochs[0]])


def test_cifar_eval_batches_are_the_test_batch_in_order_zero_padded(tmp_path):
  rows, labels = _write_cifar10(tmp_path, test=5)["test"]
  batches = data.eval_batches("cifar10", 4, data_dir=str(tmp_path), **HOST)
  assert batches.num_steps == 2
  last = batches.batch_at(1)
  np.testing.assert_array_equal(last["mask"], [1, 0, 0, 0])
  np.testing.assert_array_equal(last["label"], [labels[4], 0, 0, 0])
  assert last["image"][1:].max() == 0
  first = batches.batch_at(0)
  assert first["image"].dtype == np.float32
  np.testing.assert_array_equal(first["label"], labels[:4])
  assert first["image"][2, 5, 7, 1] == np.float32(_pixel(rows, 2, 5, 7, 1)) / np.float32(255)
  np.testing.assert_array_equal(np.round(last["image"][0] * 255), rows[4].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_missing_and_malformed_files_are_named(tmp_path):
  _write_cifar10(tmp_path)
  os.remove(tmp_path / "data_batch_3")
  with pytest.raises(ValueError, match=r"needs \['data_batch_3'\]"):
    data.load_source("cifar10", "train", data_dir=str(tmp_path))
  (tmp_path / "test_batch").write_text("not a pickle")
  with pytest.raises(ValueError, match="test_batch is not a CIFAR python pickle"):
    data.load_source("cifar10", "test", data_dir=str(tmp_path))
  _pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
  with pytest.raises(ValueError, match=r"uint8 \[N, 3072\].*\(2, 3000\)"):
    data.load_source("cifar10", "test", data_dir=str(tmp_path))
  _pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
  with pytest.raises(ValueError, match=r"lacks the keys \['labels'\]"):
    data.load_source("cifar10", "test", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ SVHN .mat


def _write_svhn(folder, split, n, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
  digits = np.arange(1, n + 1) % 10 + 1  # 1..10, with 10 for the digit 0, as SVHN stores them
  os.makedirs(folder, exist_ok=True)
  scipy.io.savemat(os.path.join(folder, f"{split}_32x32.mat"), {"X": images, "y": digits.astype(np.uint8)[:, None]})
  return images, digits


@pytest.mark.parametrize("sub", ["", "SVHN"])
def test_svhn_mat_gives_every_pixel_and_maps_label_10_to_0(tmp_path, sub):
  images, digits = _write_svhn(tmp_path / sub, "test", 12)
  source = data.load_source("svhn_cropped", "test", data_dir=str(tmp_path))
  assert len(source) == 12 and source.images.shape == (12, 32, 32, 3)
  for n in range(12):
    np.testing.assert_array_equal(source.images[n], images[:, :, :, n])
  np.testing.assert_array_equal(source.labels, [d if d != 10 else 0 for d in digits])
  assert (source.labels == 0).sum() == 1


def test_svhn_eval_padding_and_train_batches(tmp_path):
  images, digits = _write_svhn(tmp_path, "test", 5)
  train_images, train_digits = _write_svhn(tmp_path, "train", 10, seed=1)
  batch = data.eval_batches("svhn_cropped", 4, data_dir=str(tmp_path), data_format="svhn_mat", **HOST).batch_at(1)
  np.testing.assert_array_equal(batch["mask"], [1, 0, 0, 0])
  np.testing.assert_array_equal(np.round(batch["image"][0] * 255), images[:, :, :, 4])
  assert batch["label"][0] == digits[4] % 10
  batches = data.train_batches("svhn_cropped", 10, seed=0, data_dir=str(tmp_path), **HOST)
  train_batch = batches.batch_at(2)
  assert train_batch["image"].shape == (10, 32, 32, 3)
  # Which written example each row is: the same stream over the .mat images with their indices as labels.
  numbered = dataclasses.replace(batches, source=data.ArraySource(train_images.transpose(3, 0, 1, 2), np.arange(10)))
  rows = numbered.batch_at(2)["label"]
  assert sorted(rows) == list(range(10))  # the whole epoch, digit 10 (label 0) included
  np.testing.assert_array_equal(train_batch["label"], train_digits[rows] % 10)
  for image, row in zip(train_batch["image"], rows):  # a 32x32 window of the 4-padded image, maybe mirrored
    padded = np.pad(train_images[:, :, :, row], ((4, 4), (4, 4), (0, 0)))
    pixels = np.round(image * 255)
    windows = [padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    assert any(np.array_equal(pixels, w) or np.array_equal(pixels[:, ::-1], w) for w in windows)


def test_svhn_missing_and_malformed_files_are_named(tmp_path):
  _write_svhn(tmp_path, "test", 3)
  with pytest.raises(ValueError, match="train_32x32.mat, which does not exist"):
    data.load_source("svhn_cropped", "train", data_dir=str(tmp_path))
  scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
  with pytest.raises(ValueError, match=r"X must be uint8 \[32, 32, 3, N\]"):
    data.load_source("svhn_cropped", "test", data_dir=str(tmp_path))
  (tmp_path / "test_32x32.mat").write_bytes(b"\x00" * 200)
  with pytest.raises(ValueError, match="not a MATLAB"):
    data.load_source("svhn_cropped", "test", data_dir=str(tmp_path))


# -------------------------------------------------------------------------------------------- image folders


def _write_tree(root, split, classes, per_class=2, seed=0):
  """JPEGs of varied sizes (one grayscale per class); returns the paths per class in sorted order."""
  rng = np.random.default_rng(seed)
  paths = {}
  for c, name in enumerate(classes):
    folder = os.path.join(root, split, name)
    os.makedirs(folder, exist_ok=True)
    paths[name] = []
    for i in range(per_class):
      h, w = 20 + 3 * i + c, 24 + 2 * c
      array = rng.integers(0, 256, (h, w) if i == 0 else (h, w, 3), dtype=np.uint8)
      path = os.path.join(folder, f"n{c}_{i}.JPEG")
      Image.fromarray(array).save(path, quality=90)
      paths[name].append(path)
  return paths


def _pil(path):
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def test_image_folder_labels_follow_sorted_class_names_and_images_are_pils_decode(tmp_path):
  classes = ["n03", "n01", "n02"]
  paths = _write_tree(tmp_path, "train", classes)
  _write_tree(tmp_path, "val", classes, per_class=1, seed=1)
  (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
  source = data.load_source("imagenet2012", "train", data_dir=str(tmp_path))
  assert isinstance(source, data_formats.ImageFolderSource)
  assert source.classes == ("n01", "n02", "n03") and len(source) == 6
  expected = [(path, label) for label, name in enumerate(sorted(classes)) for path in paths[name]]
  for index, (path, label) in enumerate(expected):
    example = source[index]
    assert example["label"] == label and example["image"].dtype == np.uint8 and example["image"].shape[2] == 3
    np.testing.assert_array_equal(example["image"], _pil(path))
  assert len(data.load_source("imagenet2012", "validation", data_dir=str(tmp_path))) == 3
  copy = pickle.loads(pickle.dumps(source))  # grain's worker processes receive the source pickled
  np.testing.assert_array_equal(copy[5]["image"], _pil(expected[5][0]))


def test_image_folder_batches_resize_pils_decode(tmp_path):
  paths = _write_tree(tmp_path, "val", ["a", "b"], per_class=2)
  batches = data.eval_batches("imagenet2012", 3, data_dir=str(tmp_path), image_size=16, **HOST)
  assert batches.num_steps == 2
  last = batches.batch_at(1)
  np.testing.assert_array_equal(last["mask"], [1, 0, 0])
  np.testing.assert_array_equal(last["label"], [1, 0, 0])
  # torchvision's Resize(18) (18 = round(16 * 256 / 224)) of the 26x24 image: 19x18, then CenterCrop(16) at
  # top round(1) = 1, left round(1.5) = 2, then ToTensor's division by 255.
  with Image.open(paths["b"][1]) as image:
    expected = np.asarray(image.convert("RGB").resize((19, 18), Image.BILINEAR).crop((2, 1, 18, 17)))
  np.testing.assert_array_equal(last["image"][0], expected / np.float32(255))
  _write_tree(tmp_path, "train", ["a", "b"], per_class=2)
  train_batches = data.train_batches("imagenet2012", 4, seed=0, data_dir=str(tmp_path), image_size=12, **HOST)
  batch = train_batches.batch_at(0)
  assert batch["image"].shape == (4, 12, 12, 3) and sorted(batch["label"]) == [0, 0, 1, 1]
  np.testing.assert_array_equal(np.round(batch["image"] * 255) / np.float32(255), batch["image"])  # uint8 crops
  np.testing.assert_array_equal(batch["image"], train_batches.batch_at(0)["image"])


def test_image_folder_errors(tmp_path):
  _write_tree(tmp_path, "train", ["a", "b"])
  os.makedirs(tmp_path / "train" / "c")
  with pytest.raises(ValueError, match=r"class folders without images in .*train: \['c'\]"):
    data.load_source("imagenet2012", "train", data_dir=str(tmp_path))
  os.rmdir(tmp_path / "train" / "c")
  with pytest.raises(ValueError, match="val does not exist"):
    data.load_source("imagenet2012", "validation", data_dir=str(tmp_path))
  os.makedirs(tmp_path / "val")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
  with pytest.raises(ValueError, match=r"no class folders \(1 image files lie directly in it\)"):
    data.load_source("imagenet2012", "validation", data_dir=str(tmp_path))
  _write_tree(tmp_path, "val", ["a"])
  with pytest.raises(ValueError, match="different class folders"):
    data.load_source("imagenet2012", "validation", data_dir=str(tmp_path))


# -------------------------------------------------------------------------------------------------- TFDS


def _png(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _tiny_cifar10(split, n):
  """{id: (uint8 [32, 32, 3] image, label)} of `n` generated examples of `split`."""
  rng = np.random.default_rng(len(split))
  return {
    f"{split}_{i}": (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), int(rng.integers(0, 10))) for i in range(n)
  }


class _TinyCifar10(tfds.builder_cls("cifar10"), skip_registration=True):
  """TFDS's cifar10 builder (its features, version, file naming and writer) on `_tiny_cifar10`'s examples.

  The images go in PNG-encoded (with Pillow), as TFDS's own encoder would store them: its encoder needs
  TensorFlow, the rest of the writer does not.
  """

  name = "cifar10"
  sizes = {"train": 6, "test": 4}
  code_path = None  # where TFDS would look for a download checksums file; nothing is downloaded

  def _split_generators(self, dl_manager):
    return {split: self._generate(split, n) for split, n in self.sizes.items()}

  def _generate(self, split, n):
    for key, (image, label) in _tiny_cifar10(split, n).items():
      yield key, {"id": key, "image": _png(image), "label": label}


def _write_tfds_cifar10(data_dir):
  """Real TFDS ArrayRecord files of cifar10 (`<data_dir>/cifar10/3.0.2/`); returns {split: {id: (image, label)}}."""
  _TinyCifar10(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return {split: _tiny_cifar10(split, n) for split, n in _TinyCifar10.sizes.items()}


def test_tfds_array_record_files_give_the_written_pixels_and_labels(tmp_path):
  written = _write_tfds_cifar10(tmp_path)
  assert sorted(os.listdir(tmp_path / "cifar10" / "3.0.2"))[:2] == [
    "cifar10-test.array_record-00000-of-00001",
    "cifar10-train.array_record-00000-of-00001",
  ]
  assert data_formats.resolve("auto", "cifar10", str(tmp_path)) == ("tfds", str(tmp_path))
  for split, examples in written.items():
    source = data.load_source("cifar10", split, data_dir=str(tmp_path))
    assert len(source) == len(examples)
    read = {example["id"].decode(): example for example in source}  # TFDS stores examples in its own (hashed) order
    assert sorted(read) == sorted(examples)
    for key, (image, label) in examples.items():
      np.testing.assert_array_equal(read[key]["image"], image)
      assert read[key]["label"] == label


# ------------------------------------------------------------------------------------------ format choice


def test_auto_refuses_a_dataset_held_in_two_formats(tmp_path):
  _write_cifar10(tmp_path / "cifar-10-batches-py")
  os.makedirs(tmp_path / "cifar10" / "3.0.2")  # a TFDS folder beside the pickles
  with pytest.raises(
    ValueError,
    match=r"several formats \(tfds in .*; cifar_pickle in .*\).*data.format=tfds or "
    r"cifar_pickle",
  ):
    data.load_source("cifar10", "train", data_dir=str(tmp_path))
  assert len(data.load_source("cifar10", "test", data_dir=str(tmp_path), data_format="cifar_pickle")) == 5


def test_no_files_found_says_what_was_looked_for(tmp_path):
  with pytest.raises(
    ValueError,
    match="no cifar10 files.*tfds: a TFDS folder cifar10/.*cifar_pickle: .*"
    "tfds build cifar10 --file_format=array_record",
  ):
    data.load_source("cifar10", "train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="data_dir='.*nowhere' is not a folder"):
    data.load_source("cifar10", "train", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match=r"no svhn_cropped files .*svhn_mat: SVHN's train_32x32.mat"):
    data.load_source("svhn_cropped", "train", data_dir=str(tmp_path), data_format="svhn_mat")
  with pytest.raises(ValueError, match="TFDS dataset 'cifar10' .*not prepared.*tfds build cifar10"):
    data.load_source("cifar10", "train", data_dir=str(tmp_path), data_format="tfds")


@pytest.mark.parametrize(
  "name,fmt,match",
  [
    ("cifar10", "nope", "Unknown data format 'nope'; valid: auto, tfds, cifar_pickle, svhn_mat, image_folder"),
    ("cifar10", "svhn_mat", "'svhn_mat' cannot hold 'cifar10'; valid for cifar10: auto, tfds, cifar_pickle"),
    ("digits", "tfds", "'digits' ships with scikit-learn"),
  ],
)
def test_bad_format_names(tmp_path, name, fmt, match):
  with pytest.raises(ValueError, match=match):
    data.load_source(name, "train", data_dir=str(tmp_path), data_format=fmt)


def test_config_key_defaults_to_auto_and_is_checked():
  config = config_lib.default_config()
  assert config.data.format == "auto"
  config.data.format = "pickles"
  with pytest.raises(ValueError, match="config.data.format='pickles' is invalid; valid: auto, tfds, cifar_pickle"):
    config_lib.check_config(config)


def test_a_run_reads_data_format_from_its_config_and_writes_nothing_on_a_wrong_one(tmp_path):
  _write_cifar10(tmp_path / "data")
  config = config_lib.default_config()
  config.data.data_dir, config.data.format = str(tmp_path / "data"), "svhn_mat"
  with pytest.raises(ValueError, match="data.format='svhn_mat' cannot hold 'cifar10'"):
    train.run_stage(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
