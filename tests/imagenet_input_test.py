"""The ImageNet input recipe and its pipeline, each piece against an independent computation.

Data: `photos_dir` (conftest), real JPEGs at ImageNet sizes; datasets/sample_photos.py.
"""
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import imagenet
from paraformer_jax import augment, images, input_pipeline, mixing, steps
from paraformer_jax.datasets import sample_photos


def _jpeg(array, quality=90, mode=None):
  out = io.BytesIO()
  img = Image.fromarray(array)
  (img.convert(mode) if mode else img).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def _imagenet_data(photos_dir):
  data = imagenet.get_config().data
  data.data_dir = photos_dir
  return data


@pytest.mark.parametrize('size', [(500, 375), (375, 500)])
def test_inception_boxes_stay_inside_and_spread_over_the_configured_ranges(size):
  width, height = size
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  boxes = np.array([images.inception_box(width, height, scale, ratio, rng)
                    for _ in range(4000)])
  left, top, w, h = boxes.T
  assert (left >= 0).all() and (top >= 0).all()
  assert (left + w <= width).all() and (top + h <= height).all()
  area = w * h / (width * height)
  aspect = w / h
  # Whole-pixel rounding moves area and aspect by at most a pixel's worth.
  assert area.min() >= scale[0] - 2 * (w + h).max() / (width * height) and area.max() <= 1
  assert (aspect >= ratio[0] * (1 - 1 / h)).all() and (aspect <= ratio[1] * (1 + 1 / h)).all()
  # Spread: every tenth of the area range and of the log-aspect range is visited.
  assert len(np.unique(np.minimum((area - 0.08) / 0.092, 9).astype(int))) == 10
  log_aspect = (np.log(aspect) - np.log(ratio[0])) / (np.log(ratio[1]) - np.log(ratio[0]))
  assert len(np.unique(np.clip(log_aspect * 10, 0, 9).astype(int))) == 10
  # Offsets spread over the room left, not pinned to a corner.
  assert left.max() > width / 2 and top.max() > height / 2


def test_eval_center_crop_is_the_central_slice():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)  # shorter side 256 = 224 / 0.875
  box = images.center_box(300, 256, 0.875)
  assert box == (38.0, 16.0, 224.0, 224.0)
  out = np.asarray(images.crop_resize(image, box, 224, 3))
  np.testing.assert_array_equal(out, image[16:240, 38:262])


def _bilinear(image, size):
  """Bilinear resize to size x size without antialiasing, half-pixel centers (what
  tf.image.resize does with antialias=False), in float64 numpy."""
  def axis(n):
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n - 1), src - lo
  y0, y1, fy = axis(image.shape[0])
  x0, x1, fx = axis(image.shape[1])
  img = image.astype(float)
  rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
  return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize('box', [(17, 9, 301, 263), (40, 30, 150, 170), (5, 6, 224, 224)])
def test_training_crop_is_bilinear_without_antialiasing(box):
  """Downscaled, upscaled and same-size crops of a random image equal an independent numpy
  bilinear resize of the slice, within OpenCV's fixed-point rounding (1 gray level)."""
  image = np.random.default_rng(2).integers(0, 256, (375, 500, 3), dtype=np.uint8)
  left, top, w, h = box
  out = images.crop_resize_bilinear(image, box, 224, 3)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  want = _bilinear(image[top:top + h, left:left + w], 224)
  assert np.abs(out - want).max() <= 1.0
  if (w, h) == (224, 224):
    np.testing.assert_array_equal(out, image[top:top + h, left:left + w])


def test_reduced_size_decode_matches_a_full_decode(monkeypatch):
  """A 1200x1000 JPEG center-cropped to 224: libjpeg decodes it at half scale (DCT
  scaling); the result must match crop-and-resize of the full decode (PIL) within a few
  gray levels."""
  photo = next(sample_photos.photo_jpegs(1, seed=3))
  big = np.asarray(Image.open(io.BytesIO(photo)).resize((1200, 1000), Image.BICUBIC))
  data = _jpeg(big, quality=95)
  box = images.center_box(1200, 1000, 0.875)  # 875 px square -> 224: 0.256 of the pixels
  decoded = []
  real_decode = images.decode
  monkeypatch.setattr(images, 'decode', lambda *a: decoded.append(real_decode(*a).shape)
                      or real_decode(*a))
  fast = np.asarray(images.crop_resize(data, box, 224, 3))
  assert decoded == [(500, 600, 3)]  # half scale: the 437 px crop still exceeds 224
  full = np.asarray(Image.open(io.BytesIO(data)).convert('RGB').resize(
      (224, 224), Image.BILINEAR, box=(box[0], box[1], box[0] + box[2], box[1] + box[3])))
  diff = np.abs(fast.astype(int) - full.astype(int))
  assert diff.mean() < 2.0 and np.percentile(diff, 99) < 16


def _mix(batch, classes, mixup, cutmix, seed, b, first_row):
  """mixing.pair_params (made with the batch, in a worker) then mixing.apply (on device)."""
  images = batch['image']
  lam, box = mixing.pair_params(batch['mask'], mixup, cutmix, seed, b, first_row,
                                *images.shape[1:3])
  images, soft = mixing.apply(images, batch['label'], lam, box, classes)
  return {'image': np.asarray(images), 'label': np.asarray(soft)}


def test_mixup_and_cutmix_labels_are_the_mixing_weight_and_the_pasted_area():
  rows, classes = 64, 10
  batch = {'image': np.zeros((rows, 16, 16, 3), np.float32),
           'label': np.arange(rows, dtype=np.int32) % classes, 'mask': np.ones(rows, np.float32)}
  batch['image'][1::2] = 1.0  # odd rows white, even rows black: pixels tell who gave what
  for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
    out = _mix(batch, classes, mixup, cutmix, seed=0, b=3, first_row=0)
    soft = out['label']
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    own = soft[np.arange(rows), batch['label']]
    from_odd = out['image'].mean(axis=(1, 2, 3))  # share of the white (odd) row's content
    np.testing.assert_allclose(own[0::2], 1 - from_odd[0::2], atol=1e-6)
    np.testing.assert_allclose(own[1::2], from_odd[1::2], atol=1e-6)
    if cutmix and not mixup:  # pasted boxes: every pixel is all one row or the other
      assert set(np.unique(out['image'])) <= {0.0, 1.0}
    assert own.std() > 0.05  # weights vary from pair to pair


def test_mixing_does_not_depend_on_how_processes_split_the_batch(photos_dir):
  data = _imagenet_data(photos_dir)
  data.cutmix = 1.0
  source = input_pipeline.get_source('imagenet2012', 'train', photos_dir)
  whole = input_pipeline.train_batches(source, data, 8, seed=1)[2]
  parts = [input_pipeline.train_batches(source, data, 8, 1, shard=(i, 2))[2] for i in range(2)]
  for key in ('image', 'label', 'mix_lam', 'mix_box'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  soft = input_pipeline.finish(whole, data.mean, data.std, data.num_classes)['label']
  assert soft.shape == (8, 1000) and (soft.max(1) < 1).any()


def test_soft_label_loss_matches_the_integer_loss_and_smoothing_and_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  onehot = np.eye(5, dtype=np.float32)[labels]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -log_p[np.arange(6), labels]
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), want.mean(), rtol=1e-6)
  np.testing.assert_allclose(steps.cross_entropy(logits, onehot), want.mean(), rtol=1e-6)
  smooth = -(((1 - 0.1) * onehot + 0.1 / 5) * log_p).sum(-1)
  np.testing.assert_allclose(steps.cross_entropy(logits, labels, label_smoothing=0.1),
                             smooth.mean(), rtol=1e-6)
  mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
  np.testing.assert_allclose(steps.cross_entropy(logits, labels, mask), want[mask > 0].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(steps.accuracy(logits, onehot, mask),
                             (logits.argmax(-1) == labels)[mask > 0].mean())


@pytest.fixture(scope='module')
def bad_photos(tmp_path_factory):
  """A validation split with a garbage file (row 1), a truncated JPEG (row 3), a grayscale
  JPEG (row 5) and a CMYK JPEG (row 7) among real photos."""
  rows = sample_photos.examples(10, seed=11)
  good = rows[0][0]
  photo = np.asarray(Image.open(io.BytesIO(rows[5][0])))
  rows[1] = (b'not an image at all', rows[1][1])
  rows[3] = (good[:len(good) // 3], rows[3][1])
  rows[5] = (_jpeg(photo, mode='L'), rows[5][1])
  rows[7] = (_jpeg(photo, mode='CMYK'), rows[7][1])
  path = tmp_path_factory.mktemp('bad_photos')
  sample_photos.write(path, splits={'train': rows, 'validation': rows})
  return str(path), photo


def test_corrupt_images_are_skipped_with_a_warning_and_odd_modes_converted(bad_photos, caplog):
  bad_photos, photo = bad_photos
  data = _imagenet_data(bad_photos)
  source = input_pipeline.get_source('imagenet2012', 'validation', bad_photos)
  by_name = {str(source[i]['file_name'], 'utf-8') if isinstance(source[i]['file_name'], bytes)
             else source[i]['file_name']: i for i in range(len(source))}
  with caplog.at_level(logging.WARNING):
    batch = next(iter(input_pipeline.eval_batches(source, data, 16)))
  bad = sorted(by_name[f'validation_{r:05d}.JPEG'] for r in (1, 3))
  assert np.flatnonzero(batch['mask'][:10] == 0).tolist() == bad
  assert batch['mask'].sum() == 8
  batch = input_pipeline.finish(batch, data.mean, data.std, data.num_classes)
  for i in bad:
    assert any(f'Skipped example {i} ' in r.getMessage() for r in caplog.records)
  gray = batch['image'][by_name['validation_00005.JPEG']]
  assert gray.shape == (224, 224, 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])  # converted to RGB, gray
  cmyk = batch['image'][by_name['validation_00007.JPEG']]
  prep = input_pipeline.Preprocess.from_config(data, 3)
  want = augment.normalize(augment.eval_image(_jpeg(photo), prep), data.mean, data.std)
  assert np.abs(cmyk - want).mean() < 0.1  # converted back to (nearly) the RGB photo


def test_too_many_corrupt_images_stop_the_run():
  from paraformer_jax import train
  count = train.CorruptCount(max_fraction=0.01, split_size=1000)
  count.add(np.array([1.0] * 63 + [0.0]))
  count.check()  # 1 of the split's 1000: within 1%
  for _ in range(10):
    count.add(np.array([1.0] * 63 + [0.0]))
  with pytest.raises(ValueError, match=r'11 of 704 training images .*max_corrupt_fraction'):
    count.check()


class _DyingSource:
  """A source whose example `die_at` kills the worker process that reads it."""

  def __init__(self, source, die_at):
    self.source, self.die_at, self.parent = source, die_at, os.getpid()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i == self.die_at and os.getpid() != self.parent:
      os._exit(9)
    return self.source[i]

  @property
  def dataset_info(self):
    return self.source.dataset_info


@pytest.mark.slow
def test_worker_processes_count_every_eval_example_once_and_resume_bit_identical(photos_dir):
  data = _imagenet_data(photos_dir)
  val = input_pipeline.get_source('imagenet2012', 'validation', photos_dir)
  evals = input_pipeline.eval_batches(val, data, 16)
  it = input_pipeline.iterate(evals, 0, workers=2)
  got = list(it)
  it.close()
  mask = np.concatenate([b['mask'] for b in got])
  assert mask.sum() == 50 and len(got) == 4
  labels = np.concatenate([b['label'] for b in got])[mask > 0]
  np.testing.assert_array_equal(labels, [val[i]['label'] for i in range(50)])
  # Training resumed at batch 5 with workers: the batches a single process makes from 5 on.
  train = input_pipeline.get_source('imagenet2012', 'train', photos_dir)
  batches = input_pipeline.train_batches(train, data, 8, seed=2)
  it = input_pipeline.iterate(batches, 5, workers=2)
  for b in (5, 6, 7):
    batch = next(it)
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(batch[key], batches[b][key])
  it.close()


@pytest.mark.slow
def test_a_dead_worker_process_raises_a_clear_error_not_a_hang(photos_dir):
  data = _imagenet_data(photos_dir)
  val = input_pipeline.get_source('imagenet2012', 'validation', photos_dir)
  it = input_pipeline.iterate(input_pipeline.eval_batches(_DyingSource(val, 20), data, 8),
                              0, workers=2)
  with pytest.raises(input_pipeline.InputWorkerError, match='input worker process died'):
    for _ in it:
      pass
  it.close()


@pytest.mark.slow
def test_trainer_runs_the_imagenet_config_end_to_end_on_jpegs(photos_dir, tmp_path):
  from paraformer_jax import train
  config = imagenet.get_config()
  config.data.data_dir = photos_dir  # train[:99%]: 297 photos, train[99%:] 3, validation 50
  config.model.update(width=32, num_heads=1, mlp_dim=64, num_branches=2, branch_depth=1,
                      dtype='float32')
  config.training.update(epochs=1, batch_size=16, warmup_epochs=0.2)
  config.eval_batch_size = 16
  config.eval_every_steps = 0
  config.log_every_steps = 6
  config.workers = 2
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['count'] == 50  # the whole official-validation stand-in, once
  lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  steps_logged = [json.loads(l)['step'] for l in lines if 'loss' in json.loads(l)]
  assert steps_logged == [6, 12, 18]  # 297 // 16 = 18 steps, mixup on, every loss finite


@pytest.mark.parametrize('field, value, message', [
    ('train_crop', 'random', "config.data.train_crop='random': use 'pad' or 'inception'"),
    ('crop_scale', (0.5, 0.2), 'config.data.crop_scale=(0.5, 0.2): use (low, high)'),
    ('eval_crop_fraction', 1.5, 'config.data.eval_crop_fraction=1.5: use a fraction'),
    ('mixup', -0.2, 'config.data.mixup=-0.2: use a Beta parameter >= 0'),
])
def test_bad_input_settings_name_the_field(field, value, message):
  data = imagenet.get_config().data
  setattr(data, field, value)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    input_pipeline.check_config(data, local_batch=16)
  data = imagenet.get_config().data
  with pytest.raises(ValueError, match='each process loads 7 rows'):
    input_pipeline.check_config(data, local_batch=7)  # mixup pairs rows


@pytest.mark.parametrize('channels', [1, 3])
def test_flip_mirrors_the_columns(channels):
  image = np.random.default_rng(3).integers(0, 256, (4, 6, channels), dtype=np.uint8)
  out = images.flip_left_right(image)
  np.testing.assert_array_equal(out, image[:, ::-1])
  assert out.flags['C_CONTIGUOUS']
