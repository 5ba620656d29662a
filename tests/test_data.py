"""Tests of hydra_jax.data: augmentation maths, determinism, resumption, coverage, sharding.

TFDS datasets are replaced by `tfds.testing.mock_data` (random examples generated from the
builders' feature specs, read through `tfds.data_source`); nothing is downloaded.
"""

import collections
import pickle

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn import datasets as sk_datasets

from hydra_jax import data
from hydra_jax import data_formats


@pytest.fixture
def mock_tfds():
  def mock(num_examples):
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)

  return mock


def _host(**kw):
  return dict(process_index=kw.get("process_index", 0), process_count=kw.get("process_count", 1))


def _stack(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ------------------------------------------------------------------------- registry


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="'foo'.*cifar10.*digits"):
    data.get_dataset_info("foo")


def test_unknown_split_lists_valid_splits():
  with pytest.raises(ValueError, match="'valid'.*'test', 'train'"):
    data.load_source("digits", "valid")


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  for data_format in ("auto", "tfds"):
    with pytest.raises(ValueError, match="tfds build cifar10 --file_format=array_record"):
      data.load_source("cifar10", "train", data_dir=str(tmp_path), data_format=data_format)


# --------------------------------------------------------------------------- digits


def test_digits_split_is_a_stratified_partition_of_sklearn_digits():
  digits = sk_datasets.load_digits()
  train, test = data.load_source("digits", "train"), data.load_source("digits", "test")
  info = data.get_dataset_info("digits")
  assert (len(train), len(test)) == (info.split_sizes["train"], info.split_sizes["test"])
  assert (len(train), len(test)) == (1437, 360)
  images = np.concatenate([train.images, test.images])[..., 0] * 16
  labels = np.concatenate([train.labels, test.labels])
  rows = sorted(zip(map(bytes, images.astype(np.uint8)), labels))
  expected = sorted(zip(map(bytes, digits.images.astype(np.uint8)), digits.target))
  assert rows == expected
  per_class = np.bincount(test.labels) / np.bincount(digits.target)
  np.testing.assert_allclose(per_class, 0.2, atol=0.01)


def test_digits_eval_batches_are_the_test_split_in_order_scaled_to_unit():
  test = data.load_source("digits", "test")
  batches = data.eval_batches("digits", 100, **_host())
  out = _stack([batches.batch_at(s) for s in range(batches.num_steps)])
  assert batches.num_steps == 4 and out["mask"].sum() == 360
  real = out["mask"] == 1
  np.testing.assert_array_equal(out["image"][real], test.images)
  np.testing.assert_array_equal(out["label"][real], test.labels)
  assert out["image"].max() == 1.0 and out["image"].dtype == np.float32
  assert not out["image"][~real].any() and not out["label"][~real].any()


def test_digits_train_batch_shapes_dtypes_and_range():
  batch = data.train_batches("digits", 32, seed=3).batch_at(7)  # hosts from jax: 0 of 1
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_digits_train_augmentation_is_a_one_pixel_shift_without_flip():
  # Undo the augmentation: each output must equal its source shifted by at most one pixel.
  train = data.load_source("digits", "train")
  batch = data.train_batches("digits", 64, seed=1, **_host()).batch_at(0)
  shifts = set()
  for image, label in zip(batch["image"], batch["label"]):
    candidates = train.images[train.labels == label]
    padded = np.pad(candidates, ((0, 0), (1, 1), (1, 1), (0, 0)))
    found = [
      (dy, dx)
      for dy in range(3)
      for dx in range(3)
      if (padded[:, dy : dy + 8, dx : dx + 8] == image).all(axis=(1, 2, 3)).any()
    ]
    assert found, "augmented image is no 1-pixel shift of a training image"
    shifts.update(found)
  assert len(shifts) > 4


def test_image_size_upsamples_by_repetition():
  plain = data.eval_batches("digits", 8, **_host()).batch_at(0)["image"]
  big = data.eval_batches("digits", 8, image_size=32, **_host()).batch_at(0)["image"]
  assert big.shape == (8, 32, 32, 1)
  np.testing.assert_array_equal(big[:, ::4, ::4], plain)
  np.testing.assert_array_equal(big[:, 3::4, 1::4], plain)


# --------------------------------------------------------------------- augmentation


def test_pad_crop_flip_matches_brute_force():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (6, 5, 7, 2), dtype=np.uint8)
  offsets = np.array([[0, 0], [4, 4], [2, 2], [1, 3], [4, 0], [2, 2]])
  flips = np.array([False, False, False, True, True, True])
  out = data.pad_crop_flip(images, offsets, flips, pad=2)
  for b in range(6):
    for i in range(5):
      for j in range(7):
        src_i = offsets[b, 0] + i - 2
        src_j = offsets[b, 1] + (6 - j if flips[b] else j) - 2
        inside = 0 <= src_i < 5 and 0 <= src_j < 7
        expected = images[b, src_i, src_j] if inside else 0
        np.testing.assert_array_equal(out[b, i, j], expected)


def test_pad_crop_flip_special_cases():
  image = np.arange(1, 13, dtype=np.uint8).reshape(1, 3, 4, 1)
  center = np.array([[1, 1]])
  no, yes = np.array([False]), np.array([True])
  np.testing.assert_array_equal(data.pad_crop_flip(image, center, no, 1), image)
  np.testing.assert_array_equal(data.pad_crop_flip(image, center, yes, 1), image[:, :, ::-1])
  shifted = np.zeros_like(image)
  shifted[:, 1:, 1:] = image[:, :-1, :-1]  # crop at the top-left corner: content moves down-right
  np.testing.assert_array_equal(data.pad_crop_flip(image, np.array([[0, 0]]), no, 1), shifted)


def _jpeg(tmp_path, height=48, width=64, seed=0):
  """A smooth random RGB JPEG (quality 90) written with Pillow; returns its path."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
  path = str(tmp_path / "image.jpg")
  coarse.save(path, quality=90)
  return path


def _torchvision_train_recipe(path, box, flip, size):
  """torchvision's pil_loader, RandomResizedCrop (F.resized_crop: crop, then resize) and RandomHorizontalFlip
  on a Pillow image, spelled out with the Pillow calls torchvision makes; uint8 [size, size, 3]."""
  with open(path, "rb") as file, Image.open(file) as image:
    image = image.convert("RGB")
  top, left, height, width = box
  out = image.crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)
  return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)


def test_random_resized_crop_is_torchvisions_recipe_bit_for_bit(tmp_path):
  path = _jpeg(tmp_path)
  source = data_formats.ImageFolderSource((path,), np.zeros(1, np.int32), ("c",))
  rng = np.random.default_rng(0)
  for size, flip in ((24, False), (24, True), (80, True)):  # downscaled and upscaled crops
    uniforms = rng.random((10, 4))
    box = data.inception_crop_box(48, 64, uniforms)
    expected = _torchvision_train_recipe(path, box, flip, size)
    for image in (source[0]["image"], source.decode(0)):  # TFDS hands arrays over, image folders Pillow images
      out = data.random_resized_crop(image, uniforms, flip, size)
      assert out.dtype == np.uint8 and out.shape == (size, size, 3)
      np.testing.assert_array_equal(out, expected)


def test_random_resized_crop_is_the_antialiased_bilinear_resize_within_uint8_rounding():
  # Pillow rounds to uint8 after each of its two passes: at most 1 level from the exact antialiased resize.
  image = np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)
  whole = np.full((10, 4), 0.999)  # no attempt fits in 37x50: the fallback box is the whole image
  for size in (16, 61):
    exact = np.clip(jax.image.resize(image.astype(np.float32), (size, size, 3), "linear", antialias=True), 0, 255)
    out = data.random_resized_crop(image, whole, False, size)
    assert np.abs(out - exact).max() <= 1.0
    np.testing.assert_array_equal(data.random_resized_crop(image, whole, True, size), out[:, ::-1])
  square = image[:37, :37]
  np.testing.assert_array_equal(data.random_resized_crop(square, whole, False, 37), square)  # same size: a copy


def test_inception_crop_box_by_hand():
  # Attempt 1: area 0.08 + 0.92 * 0.999 of 200x100, side ~141 > width 100: rejected.
  # Attempt 2: area (0.08 + 0.92 * 0.25) * 20000 = 6200, aspect exp(0) = 1: side
  # round(78.7) = 79, top int(0.5 * 122) = 61, left int(0.25 * 22) = 5.
  uniforms = np.array([[0.999, 0.5, 0.0, 0.0], [0.25, 0.5, 0.5, 0.25]])
  assert data.inception_crop_box(200, 100, uniforms) == (61, 5, 79, 79)


def test_inception_crop_box_falls_back_to_central_crop():
  # No attempt fits a 10x100 strip: largest central crop of aspect 4/3 (round(13.3) = 13).
  assert data.inception_crop_box(10, 100, np.full((10, 4), 0.999)) == (0, 43, 10, 13)
  assert data.inception_crop_box(100, 10, np.full((10, 4), 0.999)) == (43, 0, 13, 10)
  assert data.inception_crop_box(40, 40, np.full((10, 4), 0.999)) == (0, 0, 40, 40)


def test_inception_crop_box_respects_torchvision_ranges():
  rng = np.random.default_rng(3)
  for _ in range(300):
    height, width = rng.integers(50, 400, 2)
    top, left, h, w = data.inception_crop_box(height, width, rng.random((10, 4)))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert 0.07 <= h * w / (height * width) <= 1.0  # 0.08 up to pixel rounding
    assert 0.75 / 1.1 <= w / h <= 4 / 3 * 1.1


def test_resize_center_crop_is_torchvisions_resize_then_center_crop():
  image = np.random.default_rng(6).integers(0, 256, (50, 81, 3), dtype=np.uint8)
  # torchvision's Resize(32): shorter side 32, longer int(32 * 81 / 50) = 51, the whole image resized; then
  # CenterCrop(28): top round(4 / 2) = 2, left round(23 / 2) = 12 (Python rounds half to even).
  full = np.asarray(Image.fromarray(image).resize((51, 32), Image.BILINEAR))
  np.testing.assert_array_equal(data.resize_center_crop(image, 32, 28), full[2:30, 12:40])
  np.testing.assert_array_equal(data.resize_center_crop(Image.fromarray(image), 32, 28), full[2:30, 12:40])
  tall = np.ascontiguousarray(image.transpose(1, 0, 2))  # 81x50: resized to 51x32, cropped at (12, 2)
  full = np.asarray(Image.fromarray(tall).resize((32, 51), Image.BILINEAR))
  np.testing.assert_array_equal(data.resize_center_crop(tall, 32, 28), full[12:40, 2:30])


def test_resize_center_crop_without_resampling_is_a_slice():
  image = np.random.default_rng(4).integers(0, 256, (256, 300, 3), dtype=np.uint8)
  out = data.resize_center_crop(image, 256, 224)
  np.testing.assert_array_equal(out, image[16:240, 38:262])


# -------------------------------------------------------------- determinism, resumption


def test_same_seed_and_step_give_identical_batches_other_seed_differs():
  a = data.train_batches("digits", 16, seed=0, **_host()).batch_at(40)
  b = data.train_batches("digits", 16, seed=0, **_host()).batch_at(40)
  c = data.train_batches("digits", 16, seed=1, **_host()).batch_at(40)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])


def test_resumed_stream_equals_tail_of_uninterrupted_stream():
  batches = data.train_batches("digits", 100, seed=5, **_host())  # 14 steps per epoch
  full = list(data.iterate(batches, range(0, 30)))
  resumed = list(data.iterate(data.train_batches("digits", 100, seed=5, **_host()), range(13, 30), prefetch=0))
  assert len(resumed) == 17
  for x, y in zip(full[13:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_epochs_cover_each_example_once_and_reshuffle(mock_tfds):
  # MNIST has no augmentation and mock images are distinct, so images identify examples.
  with mock_tfds(24):
    source = data.load_source("mnist", "train")
    ids = {bytes(source[i]["image"]): i for i in range(24)}
    assert len(ids) == 24
    batches = data.train_batches("mnist", 6, seed=0, **_host())
    assert batches.steps_per_epoch == 4
    epochs = []
    for epoch in range(3):
      steps = range(4 * epoch, 4 * epoch + 4)
      images = _stack([batches.batch_at(s) for s in steps])["image"]
      epochs.append([ids[bytes(np.round(im * 255).astype(np.uint8))] for im in images])
    for order in epochs:
      assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]


def test_partial_last_batch_of_epoch_is_dropped():
  batches = data.train_batches("digits", 400, seed=0, **_host())
  assert batches.steps_per_epoch == 1437 // 400 == 3
  images = _stack([batches.batch_at(s) for s in range(3)])["image"]
  assert images.shape[0] == 1200


def test_data_fraction_trains_on_a_fixed_subset(mock_tfds):
  with mock_tfds(40):
    source = data.load_source("mnist", "train")
    ids = {bytes(source[i]["image"]): i for i in range(40)}
    batches = data.train_batches("mnist", 5, seed=0, data_fraction=0.5, **_host())
    assert batches.steps_per_epoch == 4
    epochs = [
      [
        ids[bytes(np.round(im * 255).astype(np.uint8))]
        for s in range(4 * e, 4 * e + 4)
        for im in batches.batch_at(s)["image"]
      ]
      for e in range(3)
    ]
  assert len(set(epochs[0])) == 20
  assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])


# ------------------------------------------------------------------------ multi-host


def test_host_batches_concatenate_to_the_single_host_batch():
  whole = data.train_batches("digits", 24, seed=2, **_host()).batch_at(9)
  parts = [data.train_batches("digits", 24, seed=2, process_index=p, process_count=3).batch_at(9) for p in range(3)]
  for k in whole:
    np.testing.assert_array_equal(_stack(parts)[k], whole[k])


def test_hosts_read_disjoint_shards_covering_the_epoch(mock_tfds):
  with mock_tfds(16):
    source = data.load_source("mnist", "train")
    ids = {bytes(source[i]["image"]): i for i in range(16)}
    seen = collections.defaultdict(list)
    for p in range(2):
      batches = data.train_batches("mnist", 8, seed=1, process_index=p, process_count=2)
      for s in range(2):
        for im in batches.batch_at(s)["image"]:
          seen[p].append(ids[bytes(np.round(im * 255).astype(np.uint8))])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_eval_covers_split_once_across_hosts_with_padding_mask(mock_tfds):
  with mock_tfds(10):
    source = data.load_source("mnist", "test")
    hosts = [data.eval_batches("mnist", 8, process_index=p, process_count=2) for p in range(2)]
    assert [h.num_steps for h in hosts] == [2, 2]
    rows = []
    for s in range(2):
      for h in hosts:
        batch = h.batch_at(s)
        assert batch["image"].shape == (4, 28, 28, 1)
        rows += [(im, lab) for im, lab, m in zip(batch["image"], batch["label"], batch["mask"]) if m]
    assert len(rows) == 10
    for i, (im, label) in enumerate(rows):
      np.testing.assert_array_equal(np.round(im * 255), source[i]["image"])
      assert label == source[i]["label"]
    np.testing.assert_array_equal(hosts[1].batch_at(1)["mask"], 0)


def test_iterate_matches_batch_at_with_and_without_prefetch():
  batches = data.eval_batches("digits", 50, **_host())
  for prefetch in (0, 3):
    out = list(data.iterate(batches, range(batches.num_steps), prefetch=prefetch))
    assert len(out) == 8
    np.testing.assert_array_equal(out[5]["image"], batches.batch_at(5)["image"])


@pytest.mark.slow
def test_iterate_with_worker_processes_matches_synchronous():
  batches = data.train_batches("digits", 32, seed=0, **_host())
  out = list(data.iterate(batches, range(3, 9), worker_count=2))
  for step, batch in zip(range(3, 9), out):
    np.testing.assert_array_equal(batch["image"], batches.batch_at(step)["image"])


# ---------------------------------------------------------------------- TFDS shapes


@pytest.mark.parametrize(
  "name,shape",
  [("cifar10", (32, 32, 3)), ("cifar100", (32, 32, 3)), ("svhn_cropped", (32, 32, 3)), ("mnist", (28, 28, 1))],
)
def test_tfds_batches_shapes_dtypes_ranges(mock_tfds, name, shape):
  info = data.get_dataset_info(name)
  with mock_tfds(12):
    train = data.train_batches(name, 8, seed=0, **_host()).batch_at(3)
    test = data.eval_batches(name, 8, **_host()).batch_at(1)
  assert info.image_shape == shape
  assert train["image"].shape == (8, *shape) and test["image"].shape == (8, *shape)
  for batch in (train, test):
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert 0 <= batch["label"].min() and batch["label"].max() < info.num_classes
  np.testing.assert_array_equal(test["mask"], [1, 1, 1, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_training_crop_and_flip_are_applied(mock_tfds, name):
  with mock_tfds(64):
    source = data.load_source(name, "train")
    batch = data.train_batches(name, 64, seed=0, **_host()).batch_at(0)
    originals = {bytes(source[i]["image"][12:20, 12:20]): i for i in range(64)}
  flipped = shifted = 0
  for image in np.round(batch["image"] * 255).astype(np.uint8):
    border_zero = not image[0].any() or not image[-1].any() or not image[:, 0].any() or not image[:, -1].any()
    shifted += border_zero
    matches = [
      (dy, dx, f)
      for f in (False, True)
      for dy in range(-4, 5)
      for dx in range(-4, 5)
      if bytes((image[:, ::-1] if f else image)[12 + dy : 20 + dy, 12 + dx : 20 + dx]) in originals
    ]
    assert matches
    flipped += any(f for _, _, f in matches)
  assert 16 < flipped < 48 and shifted > 32


def test_imagenet_batches(mock_tfds):
  with mock_tfds(6):
    train = data.train_batches("imagenet2012", 4, seed=0, image_size=40, **_host()).batch_at(1)
    test = data.eval_batches("imagenet2012", 4, **_host()).batch_at(1)
  assert train["image"].shape == (4, 40, 40, 3) and test["image"].shape == (4, 224, 224, 3)
  for batch in (train, test):
    assert 0 <= batch["image"].min() and 0.5 < batch["image"].max() <= 1
    np.testing.assert_array_equal(np.round(batch["image"] * 255) / np.float32(255), batch["image"])  # uint8 / 255
  np.testing.assert_array_equal(test["mask"], [1, 1, 0, 0])
  assert data.get_dataset_info("imagenet2012").split_sizes["validation"] == 50000


# --------------------------------------------------------------------------- semisup


def _write_semisup(path, n, fmt="pickle"):
  """Extra image i is constant i (identifiable at the centre after any crop/flip)."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 32, 32, 3)).copy()
  content = {"data": images, "extrapolated_targets": np.arange(n) % 10}
  if fmt == "npz":
    np.savez(path, **content)
  else:
    with open(path, "wb") as f:
      pickle.dump(content, f)
  return str(path)


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_semisup_batches_append_an_equal_pseudo_labelled_half(mock_tfds, tmp_path, fmt):
  path = _write_semisup(tmp_path / f"extra.{fmt}", 40, fmt)
  with mock_tfds(16):
    plain = data.train_batches("cifar10", 8, seed=0, **_host())
    mixed = data.train_batches("cifar10", 8, seed=0, semisup_path=path, semisup_fraction=0.5, **_host())
    assert mixed.steps_per_epoch == 2
    batches = [mixed.batch_at(s) for s in range(5)]  # 5 semisup epochs of 20 // 8 = 2 steps
    np.testing.assert_array_equal(batches[3]["image"][:8], plain.batch_at(3)["image"])
  ids = []
  for batch in batches:
    assert batch["image"].shape == (16, 32, 32, 3)
    extra_ids = np.round(batch["image"][8:, 16, 16, 0] * 255).astype(int)
    np.testing.assert_array_equal(batch["label"][8:], extra_ids % 10)
    ids.append(extra_ids)
  assert len(set(np.concatenate(ids))) <= 20  # only the 50% subset is used
  for epoch in range(2):  # each semisup epoch: 16 distinct of the 20
    assert len(set(np.concatenate(ids[2 * epoch : 2 * epoch + 2]))) == 16


def test_semisup_errors(tmp_path):
  missing = str(tmp_path / "nope.pickle")
  with pytest.raises(FileNotFoundError, match="nope.pickle"):
    data.train_batches("digits", 8, semisup_path=missing, **_host())
  wrong_shape = _write_semisup(tmp_path / "extra.pickle", 20)
  with pytest.raises(ValueError, match=r"uint8 \[N, \*\(8, 8, 1\)\]"):
    data.train_batches("digits", 8, semisup_path=wrong_shape, **_host())
  with open(tmp_path / "bad.pickle", "wb") as f:
    pickle.dump({"data": np.zeros((4, 8, 8, 1), np.uint8)}, f)
  with pytest.raises(ValueError, match="extrapolated_targets"):
    data.train_batches("digits", 2, semisup_path=str(tmp_path / "bad.pickle"), **_host())


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(batch_size=10, process_count=4), "multiple of process_count 4"),
    (dict(batch_size=8, process_index=2, process_count=2), "process_index 2"),
    (dict(batch_size=2000), "exceeds the 1437 training"),
    (dict(batch_size=8, image_size=12), "image_size 12"),
    (dict(batch_size=8, data_fraction=0.0), "fractions must be in"),
  ],
)
def test_bad_train_arguments(kwargs, match):
  kwargs = {"process_index": 0, "process_count": 1, **kwargs}
  with pytest.raises(ValueError, match=match):
    data.train_batches("digits", **kwargs)


def test_bad_steps():
  with pytest.raises(ValueError, match="step must be >= 0"):
    data.train_batches("digits", 8, **_host()).batch_at(-1)
  with pytest.raises(ValueError, match=r"Eval step 4 not in \[0, 4\)"):
    data.eval_batches("digits", 100, **_host()).batch_at(4)
