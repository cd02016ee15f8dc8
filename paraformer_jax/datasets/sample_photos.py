"""ImageNet-shaped data from real photographs that ship with scikit-learn (no download).

`write(data_dir)` writes an `imagenet2012` dataset in TFDS array_record form with ImageNet's
feature spec (JPEG-encoded `Image`, 1000-class `label`, `file_name`): random crops of
scikit-learn's two sample photographs (`load_sample_images`: china.jpg and flower.jpg,
640x427), rescaled to ImageNet-typical sizes (longer side 400-500 px, 3:4 or 4:3, either
orientation), mirrored at random and saved as quality-90 JPEGs. `configs/imagenet.py` then
runs unchanged with --config.data.data_dir=DIR; tests and benchmarks/input_pipeline.py use it.
Labels are random: this data measures and tests the input, it teaches nothing.
"""
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME, VERSION = 'imagenet2012', '5.1.0'  # what TFDS's own imagenet2012 reads
NUM_CLASSES = 1000


def photo_jpegs(count: int, seed: int = 0, quality: int = 90):
  """`count` JPEG-encoded bytes, each a random crop of a sample photo at an ImageNet size."""
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  for _ in range(count):
    photo = photos[rng.integers(len(photos))]
    long_side = int(rng.integers(400, 501))
    short_side = int(round(long_side * 0.75))
    w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    # A crop of the photo with the output's aspect, 50-100% of the largest that fits.
    fit = min(photo.shape[1] / w, photo.shape[0] / h) * rng.uniform(0.5, 1.0)
    cw, ch = int(w * fit), int(h * fit)
    top = int(rng.integers(0, photo.shape[0] - ch + 1))
    left = int(rng.integers(0, photo.shape[1] - cw + 1))
    img = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    img.save(out, 'JPEG', quality=quality)
    yield out.getvalue()


def examples(count: int, seed: int = 0):
  """[(jpeg bytes, label)] with labels uniform over the 1000 classes."""
  labels = np.random.default_rng(seed + 1).integers(0, NUM_CLASSES, count)
  return list(zip(photo_jpegs(count, seed), labels.tolist()))


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes given (jpeg, label) lists as the splits of an imagenet2012 dataset."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, splits, **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            'file_name': tfds.features.Text()}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name, rows) for name, rows in self._splits.items()}

  def _generate_examples(self, split, rows):
    for i, (jpeg, label) in enumerate(rows):
      # Encoded bytes are stored as they are: no TensorFlow needed to write.
      yield i, {'image': io.BytesIO(jpeg), 'label': int(label),
                'file_name': f'{split}_{i:05d}.JPEG'}


def write(data_dir, train: int = 300, validation: int = 50, seed: int = 0, splits=None):
  """Writes the dataset into data_dir (TFDS layout) and returns data_dir.

  splits: {split: [(jpeg bytes, label)]} to write instead of fresh photos (tests use it to
  plant corrupt, grayscale or CMYK files).
  """
  splits = splits or {'train': examples(train, seed), 'validation': examples(validation,
                                                                            seed + 7)}
  _Builder(splits, data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return data_dir


# CIFAR-10's layout (TFDS cifar10 3.0.2: 32x32 RGB PNGs, 10 classes, an `id`), from the same
# photos: the paper's 32 px config runs on it unchanged (benchmarks/trainer_loop.py).
CIFAR10_NAME, CIFAR10_VERSION = 'cifar10', '3.0.2'


class _Cifar10Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  name = CIFAR10_NAME
  VERSION = tfds.core.Version(CIFAR10_VERSION)

  def __init__(self, sizes, seed, **kwargs):
    self._sizes, self._seed = sizes, seed
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description='CIFAR-10-shaped crops of two sample photographs.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(shape=(32, 32, 3)),
            'label': tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name, count, self._seed + i)
            for i, (name, count) in enumerate(self._sizes.items())}

  def _generate_examples(self, split, count, seed):
    labels = np.random.default_rng(seed + 1).integers(0, 10, count)
    for i, jpeg in enumerate(photo_jpegs(count, seed)):
      image = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB').resize((32, 32)))
      out = io.BytesIO()
      Image.fromarray(image).save(out, 'PNG')
      yield i, {'id': f'{split}_{i:05d}', 'image': io.BytesIO(out.getvalue()),
                'label': int(labels[i])}


def write_cifar10(data_dir, train: int = 5000, test: int = 500, seed: int = 0):
  """Writes a `cifar10` dataset (TFDS layout, array_record) into data_dir; returns it."""
  _Cifar10Builder({'train': train, 'test': test}, seed, data_dir=str(data_dir),
                  file_format='array_record').download_and_prepare()
  return data_dir
