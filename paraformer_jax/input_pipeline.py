"""Input pipeline: TFDS array_record sources (`tfds.data_source`) read with grain, no TensorFlow.

Training batches form an indexable grain `MapDataset`: batch i of a stage is a pure function
of (seed, i), so resuming at step i needs no iterator state beyond the step itself. Each
process reads its own share of the examples (multi-host). Evaluation batches are padded to a
fixed size and carry a mask, so every example is counted exactly once.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from paraformer_jax import augment
from paraformer_jax.datasets import sklearn_digits

LOCAL_DATASETS = {'sklearn_digits': sklearn_digits.prepare}  # built on demand, offline


def default_data_dir():
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def get_source(name: str, split: str, data_dir: str | None):
  """A random-access source of {'image', 'label'} dicts, with a clear error if unavailable."""
  data_dir = data_dir or default_data_dir()
  if name in LOCAL_DATASETS:
    LOCAL_DATASETS[name](data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset {name!r} (config.data.name). Use a TFDS name such as '
                     f"'cifar10', 'imagenet2012' or 'sklearn_digits'.") from e
  except (NotImplementedError, FileNotFoundError, AssertionError) as e:
    # TFDS's own message here is about file formats; say what to do instead.
    raise FileNotFoundError(
        f'Dataset {name!r} is not prepared as array_record in data_dir={data_dir!r}. Nothing '
        f'is downloaded during training; prepare it once with\n'
        f'  tfds build {name} --data_dir={data_dir} --file_format=array_record\n'
        f'(ImageNet needs the archives placed in {data_dir}/downloads/manual first), '
        f'or point config.data.data_dir at a directory where it is prepared.') from e


def parse_classes(spec: str) -> tuple[int, ...]:
  """config.data.classes: '' (all), '0-4', or '1,3,5' -> the labels kept."""
  classes = []
  try:
    for part in filter(None, spec.replace(' ', '').split(',')):
      lo, _, hi = part.partition('-')
      classes += range(int(lo), int(hi or lo) + 1)
  except ValueError as e:
    raise ValueError(f"config.data.classes={spec!r}: write labels like '0-4' or '1,3,5', or "
                     f"'' for all.") from e
  return tuple(sorted(set(classes)))


class ClassSubset:
  """The examples of `source` whose label is in `classes`, in their original order.

  Finding them reads every example's label once (fine for small sets; for ImageNet-sized
  splits it takes a pass over the data).
  """

  def __init__(self, source, classes):
    labels = np.array([int(source[i]['label']) for i in range(len(source))])
    self.indices = np.flatnonzero(np.isin(labels, classes))
    self.source = source

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def split_source(data_config, split: str, classes: str | None = None):
  """get_source for a split of config.data, keeping only the labels in `classes`
  (default: config.data.classes)."""
  d = data_config
  source = get_source(d.name, split, d.data_dir)
  spec = d.classes if classes is None else classes
  classes = parse_classes(spec)
  if classes and max(classes) >= d.num_classes:
    raise ValueError(f'config.data.classes={spec!r} has labels beyond '
                     f'data.num_classes={d.num_classes}: labels index the head directly.')
  return ClassSubset(source, classes) if classes else source


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What `augment.preprocess` needs, read off config.data."""
  image_size: int
  crop_padding: int
  flip: bool
  randaugment_layers: int
  randaugment_magnitude: int
  mean: float
  std: float

  @classmethod
  def from_config(cls, data):
    return cls(data.image_size, data.crop_padding, data.flip, data.randaugment_layers,
               data.randaugment_magnitude, data.mean, data.std)


SINGLE = (0, 1)  # (index, count) of a process that loads everything


def train_batches(source, data_config, batch_size: int, seed: int, shard=SINGLE):
  """Indexable, endless dataset of this process's rows of every global batch.

  All processes see one global stream: a fresh permutation of the whole split per pass
  (grain reshuffles per repetition), augmented with randomness drawn from each example's
  global position. Global batch b is stream[b * batch_size:(b + 1) * batch_size]; the
  process with `shard` = (index, count) (sharding.data_shard) loads and augments only its
  batch_size / count rows of it. So the batches, and the training, do not depend on how
  many processes share the work.
  """
  index, count = shard
  local_batch = batch_size // count
  prep = Preprocess.from_config(data_config)

  def transform(example, rng):
    return {'image': augment.preprocess(np.asarray(example['image']), prep, rng),
            'label': np.int32(example['label'])}

  stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  stream = stream.random_map(transform, seed=seed)

  def local_row(j):
    b, r = divmod(j, local_batch)
    return stream[b * batch_size + index * local_batch + r]

  rows = grain.MapDataset.range(len(stream) // batch_size * local_batch).map(local_row)
  return rows.batch(local_batch, drop_remainder=True)


def steps_per_epoch(source, batch_size: int) -> int:
  return len(source) // batch_size


def iterate(batches, start: int, workers: int = 0):
  """Iterator over batches[start:], prefetched by grain worker threads."""
  ds = batches[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=max(workers, 1), prefetch_buffer_size=4))
  return iter(ds)


def eval_batches(source, data_config, batch_size: int, shard=SINGLE):
  """Every example of this process's slice exactly once, in fixed-size padded batches.

  Yields {'image', 'label', 'mask'}; padding rows have mask 0. Slices are split by index,
  not truncated, so the remainder examples are counted too.
  """
  prep = Preprocess.from_config(data_config)
  index, count = shard
  local_batch = batch_size // count
  indices = np.array_split(np.arange(len(source)), count)[index]
  # Every process runs the same number of batches (collectives need it), padded as needed.
  per_shard = int(np.ceil(len(source) / count))
  for start in range(0, max(per_shard, 1), local_batch):
    idx = indices[start:start + local_batch]
    images = np.zeros((local_batch, prep.image_size, prep.image_size,
                       np.asarray(source[0]['image']).shape[-1]), np.float32)
    labels = np.zeros((local_batch,), np.int32)
    mask = np.zeros((local_batch,), np.float32)
    for row, i in enumerate(idx):
      example = source[int(i)]
      images[row] = augment.preprocess(np.asarray(example['image']), prep)
      labels[row] = example['label']
      mask[row] = 1.0
    yield {'image': images, 'label': labels, 'mask': mask}
