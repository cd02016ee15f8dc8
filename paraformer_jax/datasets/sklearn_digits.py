"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images) as a TFDS dataset.

The data ships with scikit-learn, so this builder downloads nothing and works offline. Pixel
values 0..16 are scaled to 0..255. Splits are fixed by a seeded permutation: 1,257 train,
180 validation, 360 test. Prepared as array_record for `tfds.data_source`, with no TensorFlow
(hence a `Tensor` feature: TFDS's `Image` feature needs TensorFlow to encode PNG).
"""
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SIZES = {'train': 1257, 'validation': 180, 'test': 360}
SPLIT_SEED = 0


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn handwritten digits, 8x8x1 uint8, 10 classes."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
      splits[name] = self._generate_examples(digits, order[start:start + size])
      start += size
    return splits

  def _generate_examples(self, digits, indices):
    for i in indices:
      image = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)[..., None]
      yield int(i), {'image': image, 'label': int(digits.target[i])}


def prepare(data_dir):
  """Builds the dataset in the local data_dir once (well under a second); later calls reuse
  it. Processes that start at once on a fresh machine (runs side by side, the processes of
  one host) take turns on a lock file: without it each built its own copy and all but the
  first failed to rename theirs into place. A prepared data_dir is only read (it may be
  read-only)."""
  builder = SklearnDigits(data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.sklearn_digits.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = SklearnDigits(data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():  # another process may have built it meanwhile
      builder.download_and_prepare()
  return builder
