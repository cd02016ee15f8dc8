"""Input pipeline throughput on ImageNet-sized JPEGs: decode, per-example work, worker scaling.

Writes (or reuses) the sample-photo imagenet2012 dataset (paraformer_jax/datasets/
sample_photos.py: real photographs, ~500x375, JPEG quality 90) and measures, in one run:
  (a) raw JPEG decode of the same files, full size to an RGB array, with PIL and with
      simplejpeg (libjpeg-turbo, what the pipeline uses; the ratios are to this one);
  (b) the train preprocessing per example, in this process: what a worker does (decode,
      crop, flip, RandAugment, to uint8; normalization and mixup run on device, in the
      trainer's jitted input_pipeline.finish);
  (c) the full train pipeline (grain, batches as the trainer gets them) with 1 and 2 worker
      processes;
  (d) the eval pipeline, per example in this process and with 1 worker process;
  (e) the authors' CIFAR recipe at 224 px per example (32x32 PNGs), for comparison;
  (f) with --big_vision_python and --big_vision: big_vision's own tf.data preprocessing of
      the same JPEGs on one core (benchmarks/big_vision_input.py, run by that Python, which
      has TensorFlow 2.15 and tensorflow-addons), and (b) over it.
(a), (b), (d, in-process) and (e) run on one core; (c) and (d, 1 worker) use that many
worker processes (the main process only collects batches).

Then the worker processes a v5e / v4 host needs to keep its chips fed, from the model's
FLOPs and an assumed MFU (--mfu), for the imagenet config and the authors' CIFAR recipe.

  python benchmarks/input_pipeline.py [--batch=64] [--seconds=10] [--mfu=0.4] \
      [--big_vision_python=TF_VENV/bin/python --big_vision=BIG_VISION_CHECKOUT]
"""
import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from configs import cifar10, imagenet  # noqa: E402
from paraformer_jax import augment, input_pipeline  # noqa: E402
from paraformer_jax.datasets import sample_photos  # noqa: E402


def rate(fn, items, seconds):
  """Items per second of fn over `items` (cycled) for about `seconds`, after one warm-up."""
  fn(items[0])
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    fn(items[count % len(items)])
    count += 1
  return count / (time.perf_counter() - start)


def pipeline_rate(batches, workers, batch, seconds):
  """Images per second of iterate(batches, workers) after the first 2 batches (start-up)."""
  it = input_pipeline.iterate(batches, 0, workers)
  for _ in range(2):
    next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    count += batch
  result = count / (time.perf_counter() - start)
  it.close()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(),
                                                         'pf_sample_photos'))
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--workers', default='1,2')
  parser.add_argument('--mfu', type=float, default=0.4,
                      help='assumed model FLOPs utilization for the host-cores estimate')
  parser.add_argument('--big_vision_python', help='a Python with TensorFlow 2.15 and '
                      'tensorflow-addons, for (f)')
  parser.add_argument('--big_vision', help='a big_vision checkout, for (f)')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  if not os.path.exists(os.path.join(args.data_dir, 'imagenet2012')):
    sample_photos.write(args.data_dir)
  data = imagenet.get_config().data
  data.data_dir = args.data_dir
  train = input_pipeline.get_source('imagenet2012', 'train', args.data_dir)
  val = input_pipeline.get_source('imagenet2012', 'validation', args.data_dir)
  jpegs = [train[i]['image'] for i in range(len(train))]
  prep = input_pipeline.Preprocess.from_config(data, 3)
  rng = np.random.default_rng(0)

  def add(name, value, base=None):
    print(f'{name:<52} {value:8.1f} img/s' + (f'  {value / base:5.2f}x decode' if base else ''),
          flush=True)
    return value

  add('(a) raw JPEG decode, PIL (1 core)',
      rate(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert('RGB')), jpegs, args.seconds))
  decode = rate(lambda b: simplejpeg.decode_jpeg(b, 'RGB'), jpegs, args.seconds)
  add('(a) raw JPEG decode, simplejpeg (1 core; the base of the ratios)', decode)
  ours = add('(b) train preprocessing per example (1 core)',
             rate(lambda b: augment.train_image(b, prep, rng), jpegs, args.seconds), decode)
  if args.big_vision_python:
    theirs = big_vision_rate(args, jpegs)
    add("(f) big_vision's tf.data train preprocessing (1 core)", theirs, decode)
    print(f'(b) / (f): {ours / theirs:.2f}x', flush=True)
  batches = input_pipeline.train_batches(train, data, args.batch, seed=0)
  per_worker = {}
  for w in [int(w) for w in args.workers.split(',')]:
    per_worker[w] = add(f'(c) train pipeline, {w} worker process{"es" if w > 1 else ""}',
        pipeline_rate(batches, w, args.batch, args.seconds), decode)
  add('(d) eval preprocessing per example (1 core)',
      rate(lambda b: augment.eval_image(b, prep), jpegs, args.seconds), decode)
  evals = input_pipeline.eval_batches(val, data, 16)  # 50 images; cycled by repeat
  add('(d) eval pipeline, 1 worker process',
      pipeline_rate(evals.repeat(), 1, 16, args.seconds), decode)
  cifar = cifar10.get_config().data
  pngs = []
  for b in jpegs[:64]:
    out = io.BytesIO()
    Image.open(io.BytesIO(b)).convert('RGB').resize((32, 32), Image.BILINEAR).save(out, 'PNG')
    pngs.append(out.getvalue())
  cprep = input_pipeline.Preprocess.from_config(cifar, 3)
  cifar_rate = add('(e) CIFAR recipe at 224 px per example (32x32 PNG, 1 core)',
      rate(lambda b: augment.train_image(b, cprep, rng), pngs, args.seconds))
  print(f'\ncores: {os.cpu_count()}; images {len(jpegs)} train JPEGs, mean '
        f'{np.mean([len(b) for b in jpegs]) / 1024:.0f} KiB')
  if len(per_worker) > 1:
    (lo, r_lo), (hi, r_hi) = min(per_worker.items()), max(per_worker.items())
    print(f'{hi} workers / {lo}: {r_hi / r_lo:.2f}x')
  one = min(per_worker.items())
  host_cores({'imagenet': one[1] / one[0], 'cifar10': cifar_rate}, args.mfu)


def big_vision_rate(args, jpegs):
  """benchmarks/big_vision_input.py's img/s over `jpegs`, in the --big_vision_python."""
  with tempfile.TemporaryDirectory() as tmp:
    for i, b in enumerate(jpegs):
      with open(os.path.join(tmp, f'{i:05d}.jpg'), 'wb') as f:
        f.write(b)
    out = subprocess.run(
        [args.big_vision_python, os.path.join(os.path.dirname(__file__), 'big_vision_input.py'),
         f'--big_vision={args.big_vision}', f'--jpegs={tmp}', f'--seconds={args.seconds}'],
        capture_output=True, text=True, check=True, timeout=600).stdout
  return float(re.search(r'([0-9.]+) img/s', out).group(1))


# (bf16 peak FLOP/s per chip, chips per host, vCPUs per host) of the hosts our users run on.
TPU_HOSTS = {'v5e': (197e12, 4, 112), 'v4': (275e12, 4, 240)}


def host_cores(per_core, mfu):
  """Worker processes a host needs to keep up with its chips: the model's step rate at
  `mfu` of peak (a training image costs 3x its forward FLOPs) over the measured per-core
  input rate."""
  from paraformer_jax import flops, run_state
  print(f'\nHost cores to keep up, at {mfu:.0%} MFU (training = 3x forward FLOPs):')
  for name, config in (('imagenet', imagenet.get_config()), ('cifar10', cifar10.get_config())):
    model = run_state.build_model(config)
    flop = 3 * flops.forward_flops(model, config.data.image_size, 3, executed=True)
    for chip, (peak, chips, vcpus) in TPU_HOSTS.items():
      need = chips * peak * mfu / flop
      print(f'  {name:<8} recipe at {config.data.image_size} px, {chip} host ({chips} chips): '
            f'{need:,.0f} img/s -> {need / per_core[name]:.0f} cores of {vcpus} '
            f'(at {per_core[name]:.0f} img/s per core)')


if __name__ == '__main__':
  main()
