"""Input pipelines on real JPEGs and on the real digits; clear errors for bad datasets; every
config in configs/ passes the checks."""
import dataclasses
import importlib
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import cifar10, digits, imagenet
from paraformer_jax import augment, input_pipeline, randaugment, run_checks


def _check_batch(batch, config, batch_size, channels):
  assert batch['image'].dtype == np.uint8  # normalized on device, by finish
  d = config.data
  batch = input_pipeline.finish(batch, d.mean, d.std, d.num_classes)
  size = config.data.image_size
  assert batch['image'].shape == (batch_size, size, size, channels)
  assert batch['image'].dtype == np.float32
  lo = (0 - config.data.mean) / config.data.std
  hi = (1 - config.data.mean) / config.data.std
  assert lo - 1e-5 <= batch['image'].min() and batch['image'].max() <= hi + 1e-5
  assert batch['image'].std() > 0.05  # not a constant image
  assert np.all((0 <= batch['label']) & (batch['label'] < config.data.num_classes))


@pytest.mark.parametrize('get_config', [cifar10.get_config, imagenet.get_config],
                         ids=['cifar_recipe', 'imagenet_recipe'])
def test_both_recipes_make_shaped_normalized_batches_from_jpegs(get_config, photos_dir):
  config = get_config()
  config.data.name, config.data.data_dir = 'imagenet2012', photos_dir
  config.data.num_classes = 1000
  config.data.mixup = 0.0
  source = input_pipeline.get_source('imagenet2012', 'train', photos_dir)
  assert isinstance(source[0]['image'], bytes)  # decoded by us, at the size the crop needs
  batches = input_pipeline.train_batches(source, config.data, batch_size=4, seed=0)
  _check_batch(batches[0], config, 4, 3)
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])
  test = input_pipeline.get_source('imagenet2012', 'validation', photos_dir)
  evals = list(input_pipeline.eval_batches(test, config.data, batch_size=16))
  assert [b['mask'].sum() for b in evals] == [16, 16, 16, 2]  # 50 examples, each once
  _check_batch(evals[0], config, 16, 3)


def test_train_batches_are_a_pure_function_of_seed_and_index(tmp_path):
  config = digits.get_config()
  source = input_pipeline.get_source('sklearn_digits', 'train', str(tmp_path))
  assert len(source) == 1257
  a = input_pipeline.train_batches(source, config.data, batch_size=64, seed=3)
  b = input_pipeline.train_batches(source, config.data, batch_size=64, seed=3)
  np.testing.assert_array_equal(a[25]['image'], b[25]['image'])
  it = input_pipeline.iterate(a, 25)
  np.testing.assert_array_equal(next(it)['label'], b[25]['label'])
  # One pass (19 batches) sees 19 * 64 distinct examples; the next pass reshuffles.
  assert input_pipeline.steps_per_epoch(source, 64) == 19
  c = input_pipeline.train_batches(source, config.data, batch_size=64, seed=4)
  assert not np.array_equal(a[0]['label'], c[0]['label'])


def test_random_crop_and_rand_augment_keep_shapes():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  cropped = augment.random_crop(image, 4, rng)
  assert cropped.shape == image.shape
  # Zero padding of 4: the crop is the image shifted by at most 4 pixels.
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  assert any(np.array_equal(cropped, padded[t:t + 16, l:l + 16])
             for t in range(9) for l in range(9))
  prep = input_pipeline.Preprocess.from_config(digits.get_config().data, 3)
  for kind in ('authors', 'big_vision'):
    prep = dataclasses.replace(prep, randaugment=kind, randaugment_layers=2,
                               randaugment_magnitude=10)
    out = augment.rand_augment(image, prep, rng)
    assert out.shape == image.shape and out.dtype == np.uint8, kind
  gray = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
  prep = dataclasses.replace(prep, randaugment='authors', channels=1)
  assert augment.rand_augment(gray, prep, rng).shape == (8, 8, 1)


def test_unknown_and_unprepared_datasets_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_set'"):
    input_pipeline.get_source('no_such_set', 'train', str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'tfds build cifar10 --data_dir=.* '
                                              r'--file_format=array_record'):
    input_pipeline.get_source('cifar10', 'train', str(tmp_path))


def test_process_slices_concatenate_to_the_single_process_batch(tmp_path):
  config = digits.get_config()
  config.data.crop_padding = 2  # random augmentation must agree too
  source = input_pipeline.get_source('sklearn_digits', 'train', str(tmp_path))
  whole = input_pipeline.train_batches(source, config.data, batch_size=64, seed=0)
  parts = [input_pipeline.train_batches(source, config.data, 64, 0, shard=(i, 4))
           for i in range(4)]
  for b in (0, 19, 40):  # within the first pass and after reshuffles
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), whole[b][key])


@pytest.mark.parametrize('op', ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'])
def test_geometric_ops_fill_with_gray_on_every_channel(op):
  """Pillow turns a bare fillcolor=128 into dark red (128, 0, 0) on an RGB image."""
  from PIL import Image
  image = np.full((32, 32, 3), (0, 255, 0), np.uint8)  # green: the fill stands out
  out = np.asarray(randaugment.BIG_VISION_OPS[op](Image.fromarray(image), 10.,
                                                  np.random.default_rng(0)))
  filled = (out != image).any(-1)
  assert filled.sum() > 20  # the op moved the image and exposed fill
  assert (out[filled] == 128).all()  # nearest neighbour: every exposed pixel is gray


def _indexed_source(n):
  """n examples whose 8x8 image holds its own index (mod 256) and whose label is the index."""
  return [{'image': np.full((8, 8, 1), i % 256, np.uint8), 'label': i} for i in range(n)]


def test_each_pass_is_one_permutation_and_seeds_share_no_order():
  config = digits.get_config()  # no random augmentation: images pass through
  source = _indexed_source(100)
  batches = input_pipeline.train_batches(source, config.data, batch_size=8, seed=5)
  labels = [batches[b]['label'] for b in range(36)]  # 12 batches per pass, 96 of 100 used
  passes = [np.concatenate(labels[12 * e:12 * (e + 1)]) for e in range(3)]
  for p in passes:
    assert len(set(p.tolist())) == 96  # no example twice within a pass
  assert not np.array_equal(passes[0], passes[1])  # each pass reshuffles
  from paraformer_jax import run_state
  seeds = [run_state.data_seed(s, stage) for s in range(5) for stage in range(2)]
  assert len(set(seeds)) == 10
  # Seed 1 does not replay seed 0's second pass (it did, when seeds were seed + k).
  other = input_pipeline.train_batches(source, config.data, 8, run_state.data_seed(1, 0))
  assert not np.array_equal(np.concatenate([other[b]['label'] for b in range(12)]), passes[1])
  keys = {tuple(np.asarray(run_state.rng_stream(s, name, 0)).tolist())
          for s in range(5) for name in ('init', 'dropout', 'data')}
  assert len(keys) == 15


CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
                 if p.stem != '__init__')


@pytest.mark.parametrize('name, variant', [(n, None) for n in CONFIGS] + [('cifar10', '32px')])
def test_every_config_loads_and_passes_the_checks(name, variant):
  from paraformer_jax import sharding
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(variant) if variant else module.get_config()
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.branch, devices=jax.devices()[:4])
  run_checks.check_config(config, mesh)  # raises on anything that cannot work


def test_processes_starting_at_once_on_a_fresh_data_dir_all_get_the_digits(tmp_path):
  """Four processes released together into an empty data_dir (runs side by side on a fresh
  machine): each gets the full dataset, and none fails on another's half-built copy."""
  go = tmp_path / 'go'
  child = (
      'import os, sys, time\n'
      'from paraformer_jax.datasets import sklearn_digits\n'
      f'open(os.path.join({str(tmp_path)!r}, "ready_" + sys.argv[1]), "w").close()\n'
      f'while not os.path.exists({str(go)!r}): time.sleep(0.005)\n'
      f'b = sklearn_digits.prepare({str(tmp_path / "tfds")!r})\n'
      'print(b.info.splits["train"].num_examples)\n')
  procs = [subprocess.Popen([sys.executable, '-c', child, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(4)]
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob('ready_*'))) < 4 and time.monotonic() < deadline:
    time.sleep(0.05)
  go.touch()
  results = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in results]
  assert [out.split()[-1] for out, _ in results] == ['1257'] * 4
  assert not [n for n in os.listdir(tmp_path / 'tfds' / 'sklearn_digits')
              if n.startswith('incomplete')]


def test_a_prepared_data_dir_is_only_read(tmp_path):
  """Once the digits are prepared, prepare() writes nothing there (no lock file either), so
  a data_dir shared read-only still serves them."""
  from paraformer_jax.datasets import sklearn_digits
  data_dir = tmp_path / 'tfds'
  sklearn_digits.prepare(str(data_dir))
  (data_dir / '.sklearn_digits.lock').unlink()
  before = sorted((p, p.stat().st_mtime_ns) for p in data_dir.rglob('*'))
  assert sklearn_digits.prepare(str(data_dir)).info.splits['train'].num_examples == 1257
  assert sorted((p, p.stat().st_mtime_ns) for p in data_dir.rglob('*')) == before


# randomaug.py's augment_list (DUAT-Maker/Shallow-Paraformer at 7aa4532): (min, max) per op;
# its RandAugment gives op `val = m / 30 * (max - min) + min`.
AUTHORS_RANGES = {
    'AutoContrast': (0, 1), 'Equalize': (0, 1), 'Invert': (0, 1), 'Rotate': (0, 30),
    'Posterize': (0, 4), 'Solarize': (0, 256), 'SolarizeAdd': (0, 110),
    'Color': (0.1, 1.9), 'Contrast': (0.1, 1.9), 'Brightness': (0.1, 1.9),
    'Sharpness': (0.1, 1.9), 'ShearX': (0., 0.3), 'ShearY': (0., 0.3),
    'TranslateXabs': (0., 100), 'TranslateYabs': (0., 100), 'CutoutAbs': (0, 40)}


@pytest.mark.parametrize('get_config', [cifar10.get_config, imagenet.get_config],
                         ids=['authors', 'big_vision'])
def test_the_configs_magnitude_reaches_every_op_as_its_source_maps_it(get_config, photos_dir,
                                                                      monkeypatch):
  """Through the input pipeline: the paper's configs (the authors' RandAugment(2, 14)) give
  each op randomaug.py's value for m = 14; imagenet's (big_vision's randaug(2, 10)) gives each
  op the level 10, which TF's level_to_arg maps inside the op (tested op by op in
  randaugment_test.py)."""
  config = get_config()
  config.data.name, config.data.data_dir = 'imagenet2012', photos_dir
  config.data.num_classes, config.data.mixup = 1000, 0.0
  d = config.data
  table = randaugment.AUTHORS_OPS if d.randaugment == 'authors' else randaugment.BIG_VISION_OPS
  seen = []

  def spy(name, op):
    def recorded(img, value, rng):
      seen.append((name, value))
      return op(img, value, rng)
    return recorded
  for name, entry in list(table.items()):
    monkeypatch.setitem(table, name, (spy(name, entry[0]), *entry[1:])
                        if isinstance(entry, tuple) else spy(name, entry))
  source = input_pipeline.get_source('imagenet2012', 'train', photos_dir)
  batches = input_pipeline.train_batches(source, d, batch_size=16, seed=0)
  for b in range(4):
    batches[b]
  assert len(seen) == 2 * 16 * 4  # two ops per image
  assert len({name for name, _ in seen}) >= 12  # most of the 16 ops were drawn
  if d.randaugment == 'authors':
    assert (d.randaugment_layers, d.randaugment_magnitude) == (2, 14)
    for name, value in seen:
      lo, hi = AUTHORS_RANGES[name]
      assert value == pytest.approx(14 / 30 * (hi - lo) + lo, rel=1e-12), name
  else:
    assert (d.randaugment_layers, d.randaugment_magnitude) == (2, 10)
    assert {value for _, value in seen} == {10.0}
