"""Input pipeline: TFDS array_record sources (`tfds.data_source`) read with grain, no TensorFlow.

Training batches form an indexable grain `MapDataset`: batch i of a stage is a pure function
of (seed, i), so resuming at step i needs no iterator state beyond the step itself, with or
without worker processes. Each process reads its own share of the examples (multi-host).
Evaluation batches are padded to a fixed size and carry a mask, so every example is counted
exactly once. An image that does not decode is skipped (mask 0) with a warning naming it.
"""
from __future__ import annotations

import dataclasses
import difflib
import gc
import os

from absl import flags
from absl import logging
import chex
import grain
import numpy as np
import tensorflow_datasets as tfds

from paraformer_jax import augment
from paraformer_jax import images
from paraformer_jax import mixing
from paraformer_jax import randaugment
from paraformer_jax.datasets import sklearn_digits

LOCAL_DATASETS = {'sklearn_digits': sklearn_digits.prepare}  # built on demand, offline


def default_data_dir():
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def get_source(name: str, split: str, data_dir: str | None):
  """A random-access source of {'image', 'label'} dicts, with a clear error if unavailable.

  Encoded images (TFDS `Image` features: ImageNet's JPEGs, CIFAR's PNGs) come as bytes, for
  `images` to decode at the size the crop needs; other image features come as arrays.
  """
  data_dir = data_dir or default_data_dir()
  in_bucket = '://' in data_dir
  if name in LOCAL_DATASETS and not in_bucket:  # array_record cannot write to a bucket
    LOCAL_DATASETS[name](data_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    if isinstance(source.dataset_info.features['image'], tfds.features.Image):
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={'image': tfds.decode.SkipDecoding()})
    return source
  except tfds.core.registered.DatasetNotFoundError as e:
    known = [*tfds.core.registered.list_imported_builders(), *LOCAL_DATASETS]
    near = difflib.get_close_matches(name, known, n=1)
    hint = f'Did you mean {near[0]!r}? ' if near else ''
    raise ValueError(f'Unknown dataset {name!r} (config.data.name). {hint}Use a TFDS name such '
                     f"as 'cifar10', 'imagenet2012' or 'sklearn_digits'.") from e
  except (NotImplementedError, FileNotFoundError, AssertionError) as e:
    # TFDS's own message here is about file formats; say what to do instead.
    raise FileNotFoundError(not_prepared(name, data_dir)) from e


def not_prepared(name: str, data_dir: str) -> str:
  """What to do when `name` is not in `data_dir`: prepare it there, or (a bucket, which
  array_record cannot write) prepare it locally and copy it up."""
  build = (f'python -c "from paraformer_jax import input_pipeline as p; p.get_source({name!r}, '
           f"'train', '/tmp/tfds')\"" if name in LOCAL_DATASETS else
           f'tfds build {name} --data_dir=/tmp/tfds --file_format=array_record')
  if '://' in data_dir:
    return (f'Dataset {name!r} is not prepared as array_record in data_dir={data_dir!r}. '
            f'Nothing is downloaded during training, and TFDS cannot write array_record to a '
            f'bucket: prepare it on a local disk and copy its directory up, e.g.\n'
            f'  {build}\n'
            f'  gcloud storage cp -r /tmp/tfds/{name} {data_dir.rstrip("/")}/\n'
            f'(ImageNet needs the archives in /tmp/tfds/downloads/manual first), or point '
            f'config.data.data_dir at a directory where it is prepared.')
  return (f'Dataset {name!r} is not prepared as array_record in data_dir={data_dir!r}. Nothing '
          f'is downloaded during training; prepare it once with\n'
          f'  {build.replace("/tmp/tfds", data_dir)}\n'
          f'(ImageNet needs the archives placed in {data_dir}/downloads/manual first), '
          f'or point config.data.data_dir at a directory where it is prepared.')


def image_channels(source) -> int:
  """Channels of the source's images, from its feature spec (nothing decoded)."""
  info = getattr(source, 'dataset_info', None)
  shape = info.features['image'].shape if info is not None else (None,)
  return int(shape[-1]) if shape[-1] else images.decode(source[0]['image'], 3).shape[-1]


def format_classes(classes) -> str:
  """The inverse of parse_classes: (0, 1, 2, 4) -> '0-2,4'."""
  runs, out = sorted(set(int(c) for c in classes)), []
  for c in runs:
    if out and out[-1][1] == c - 1:
      out[-1][1] = c
    else:
      out.append([c, c])
  return ','.join(f'{a}' if a == b else f'{a}-{b}' for a, b in out)


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


class Subset:
  """The examples of `source` at `indices`, in that order."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  @property
  def dataset_info(self):
    return getattr(self.source, 'dataset_info', None)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def class_subset(source, classes) -> Subset:
  """The examples of `source` whose label is in `classes`, in their original order.

  Finding them reads every example's label once (fine for small sets; for ImageNet-sized
  splits it takes a pass over the data).
  """
  return Subset(source, np.flatnonzero(np.isin(labels_of(source), classes)))


def labels_of(source) -> np.ndarray:
  """Every example's label, in order (reads each example once)."""
  return np.array([int(source[i]['label']) for i in range(len(source))])


class Concat:
  """Sources one after the other (the new classes' examples, then replayed old ones)."""

  def __init__(self, *sources):
    self.sources = sources
    self.starts = np.cumsum([0] + [len(s) for s in sources])

  def __len__(self):
    return int(self.starts[-1])

  @property
  def dataset_info(self):
    return getattr(self.sources[0], 'dataset_info', None)

  def __getitem__(self, i):
    k = int(np.searchsorted(self.starts, i, side='right')) - 1
    return self.sources[k][i - int(self.starts[k])]


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
  return class_subset(source, classes) if classes else source


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What `augment.train_image` / `eval_image` need, read off config.data."""
  image_size: int
  channels: int
  train_crop: str
  crop_padding: int
  crop_scale: tuple
  crop_ratio: tuple
  flip: bool
  randaugment: str
  randaugment_layers: int
  randaugment_magnitude: int
  eval_crop: str
  eval_crop_fraction: float
  mean: float
  std: float

  @classmethod
  def from_config(cls, data, channels: int):
    randaugment.check(data.randaugment, data.randaugment_layers, data.randaugment_magnitude,
                      channels)
    return cls(data.image_size, channels, data.train_crop, data.crop_padding,
               tuple(data.crop_scale), tuple(data.crop_ratio), data.flip, data.randaugment,
               data.randaugment_layers, data.randaugment_magnitude, data.eval_crop,
               data.eval_crop_fraction, data.mean, data.std)


SINGLE = (0, 1)  # (index, count) of a process that loads everything


def check_config(data, local_batch: int):
  """Refuse input settings that cannot work, naming the field and what it accepts."""
  checks = [
      (data.train_crop in ('pad', 'inception'), 'train_crop', "'pad' or 'inception'"),
      (data.eval_crop in ('resize', 'center'), 'eval_crop', "'resize' or 'center'"),
      (len(data.crop_scale) == 2 and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1,
       'crop_scale', '(low, high) with 0 < low <= high <= 1'),
      (len(data.crop_ratio) == 2 and 0 < data.crop_ratio[0] <= data.crop_ratio[1],
       'crop_ratio', '(low, high) with 0 < low <= high'),
      (0 < data.eval_crop_fraction <= 1, 'eval_crop_fraction', 'a fraction in (0, 1]'),
      (data.mixup >= 0, 'mixup', 'a Beta parameter >= 0 (0: off)'),
      (data.cutmix >= 0, 'cutmix', 'a Beta parameter >= 0 (0: off)'),
      (0 <= data.max_corrupt_fraction <= 1, 'max_corrupt_fraction', 'a fraction in [0, 1]'),
  ]
  for ok, field, accepts in checks:
    if not ok:
      raise ValueError(f'config.data.{field}={getattr(data, field)!r}: use {accepts}.')
  randaugment.check(data.randaugment, data.randaugment_layers, data.randaugment_magnitude)
  if (data.mixup or data.cutmix) and local_batch % 2:
    raise ValueError(f'Mixup / CutMix mix rows in pairs, but each process loads '
                     f'{local_batch} rows of the batch; use an even batch per process.')


def _load(source, i: int, prep: Preprocess, make_image):
  """(uint8 image, label, 1.0) of example i, or a blank row with mask 0.0 if it does not
  decode."""
  example = source[i]
  try:
    return make_image(example['image']), int(example['label']), 1.0
  except images.CorruptImage as e:
    logging.warning('Skipped example %d of split %r: its image does not decode (%s).', i,
                    getattr(source, 'split', '?'), e)
    return _blank(prep)


def _blank(prep):
  return np.zeros((prep.image_size, prep.image_size, prep.channels), np.uint8), 0, 0.0


def _stack(rows):
  image, label, mask = zip(*rows)
  return {'image': np.stack(image), 'label': np.array(label, np.int32),
          'mask': np.array(mask, np.float32)}


def finish(batch, mean: float, std: float, num_classes: int):
  """uint8 batch -> normalized float32 images, mixed if it carries mixing parameters (soft
  labels). Written for jax.jit on the global batch: the trainer runs it on device, so the
  host only decodes and augments, and moves a quarter of the bytes float32 would take."""
  chex.assert_rank(batch['image'], 4)
  chex.assert_equal_shape_prefix([batch['image'], batch['label'], batch['mask']], 1)
  image = augment.normalize(batch['image'], mean, std)  # numpy or jax arrays alike
  out = {'image': image, 'label': batch['label'], 'mask': batch['mask']}
  if 'mix_lam' in batch:
    out['image'], out['label'] = mixing.apply(image, batch['label'], batch['mix_lam'],
                                              batch['mix_box'], num_classes)
  return out


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Global batch b -> this process's rows, uint8 (a picklable callable for grain's workers)."""
  source: object
  prep: Preprocess
  seed: int
  batch_size: int
  shard: tuple
  mixup: float
  cutmix: float

  def __call__(self, b: int):
    index, count = self.shard
    local = self.batch_size // count
    first = index * local
    # Batch b belongs to pass e over the split, each pass its own permutation.
    per_pass = len(self.source) // self.batch_size
    e, offset = divmod(b, per_pass)
    pass_seed = int(np.random.SeedSequence((self.seed, e)).generate_state(1)[0])
    order = grain.MapDataset.range(len(self.source)).shuffle(seed=pass_seed)
    rows = []
    for r in range(local):
      p = offset * self.batch_size + first + r  # position in pass e's permutation
      rng = np.random.default_rng((self.seed, e, p))
      rows.append(_load(self.source, int(order[p]), self.prep,
                        lambda data: augment.train_image(data, self.prep, rng)))
    batch = _stack(rows)
    if self.mixup > 0 or self.cutmix > 0:
      size = self.prep.image_size
      batch['mix_lam'], batch['mix_box'] = mixing.pair_params(
          batch['mask'], self.mixup, self.cutmix, self.seed, b, first, size, size)
    return batch


def train_batches(source, data_config, batch_size: int, seed: int, shard=SINGLE):
  """Indexable, endless dataset of this process's rows of every global batch.

  Passes over the split (an epoch; lpa's epoch is two) follow one another: pass e is a
  permutation of the split drawn from (seed, e), cut into len // batch_size global batches
  (the remainder waits for another pass), so batch b is batch b % per_pass of pass
  b // per_pass. Each example's augmentation draws from (seed, e, its position in the
  pass). The process with `shard` = (index, count) (sharding.data_shard) loads and augments
  only its batch_size / count rows of each global batch. So the batches, and the training,
  do not depend on how many processes share the work. Rows: 'image' uint8, 'label', 'mask'
  (0 for an image that did not decode), and with mixup or cutmix 'mix_lam' and 'mix_box';
  `finish` makes the model's input of them.
  """
  d = data_config
  prep = Preprocess.from_config(d, image_channels(source))
  make = _TrainBatch(source, prep, seed, batch_size, tuple(shard), d.mixup, d.cutmix)
  return grain.MapDataset.range(np.iinfo(np.int64).max // batch_size).map(make)


def steps_per_epoch(source, batch_size: int) -> int:
  return len(source) // batch_size


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  source: object
  prep: Preprocess
  indices: np.ndarray  # this process's examples
  local_batch: int

  def __call__(self, k: int):
    idx = self.indices[k * self.local_batch:(k + 1) * self.local_batch]
    rows = [_load(self.source, int(i), self.prep,
                  lambda data: augment.eval_image(data, self.prep)) for i in idx]
    return _stack(rows + [_blank(self.prep)] * (self.local_batch - len(rows)))


def eval_batches(source, data_config, batch_size: int, shard=SINGLE):
  """Every example of this process's slice exactly once, in fixed-size padded batches.

  A dataset of {'image' (uint8), 'label', 'mask'}; padding rows (and images that do not decode) have
  mask 0. Slices are split by index, not truncated, so the remainder examples count too;
  every process gets the same number of batches (collectives need it).
  """
  index, count = shard
  local_batch = batch_size // count
  indices = np.array_split(np.arange(len(source)), count)[index]
  per_shard = max(int(np.ceil(len(source) / count)), 1)
  prep = Preprocess.from_config(data_config, image_channels(source))
  return grain.MapDataset.range(-(-per_shard // local_batch)).map(
      _EvalBatch(source, prep, indices, local_batch))


class InputWorkerError(OSError):
  """A grain worker process died (a resource failure, like a full disk: the message is
  complete, and the same command resumes)."""


class Batches:
  """Iterator over a batch dataset from `start`; `close()` stops the workers.

  workers > 0: that many grain worker *processes* (each prepares whole batches, in order);
  0: one prefetching thread in this process (small datasets, where starting processes
  costs more than it saves).
  """

  def __init__(self, batches, start: int, workers: int = 0):
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app, use defaults
      flags.FLAGS.mark_as_parsed()
    ds = batches[start:].to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                           prefetch_buffer_size=4))
    if workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=2))
    self._it = iter(ds)
    self.workers = workers

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._it)
    except RuntimeError as e:
      if 'terminated unexpectedly' not in str(e):
        raise
      raise InputWorkerError(
          f'An input worker process died ({e}). Common causes: the host ran out of memory '
          f'(lower config.workers={self.workers} or the batch size) or a crash in image '
          f'decoding. The last checkpoint is intact; the same command resumes from it.') from None

  def close(self):
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()
    # Collected now, not at interpreter exit, where grain's iterators print errors.
    self._it = None
    gc.collect()


def iterate(batches, start: int = 0, workers: int = 0) -> Batches:
  return Batches(batches, start, workers)
