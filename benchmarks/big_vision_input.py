"""big_vision's own ImageNet train preprocessing, timed on one core over given JPEG files.

The ops of big_vision's vit_s16_i1k config, unchanged:
`decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,10)` (big_vision/pp/ops_image.py and
pp/archive/randaug.py, TF's autoaugment), in a sequential tf.data map with one intra-op and
one inter-op thread. It needs TensorFlow 2.15 and tensorflow-addons (which big_vision's
randaug uses) and a big_vision checkout; none of them is a dependency of paraformer_jax, so
`benchmarks/input_pipeline.py --big_vision_python=...` runs this in that environment on the
JPEGs it measures, and prints the ratio. Alone:

  python benchmarks/big_vision_input.py --big_vision=/path/to/big_vision --jpegs=DIR
"""
import argparse
import glob
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--big_vision', required=True, help='a checkout (the directory holding '
                      'the big_vision package)')
  parser.add_argument('--jpegs', required=True, help='a directory of .jpg files')
  parser.add_argument('--seconds', type=float, default=10.0)
  args = parser.parse_args()
  sys.path.insert(0, args.big_vision)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  from big_vision.pp import ops_image  # pylint: disable=import-outside-toplevel
  from big_vision.pp.archive import randaug  # pylint: disable=import-outside-toplevel

  crop = ops_image.get_decode_jpeg_and_inception_crop(224)
  flip, aug = ops_image.get_random_flip_lr(), randaug.get_randaug(2, 10)

  def pp(data):
    return aug(flip(crop({'image': data})))['image']

  files = sorted(glob.glob(os.path.join(args.jpegs, '*.jpg')))
  jpegs = [open(f, 'rb').read() for f in files]
  tf.random.set_seed(0)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().map(pp).with_options(options)
  it = iter(ds)
  for _ in range(len(jpegs)):  # warm-up: tracing, and each file read once
    next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    next(it)
    count += 1
  print(f'big_vision train preprocessing (tf.data, 1 thread): '
        f'{count / (time.perf_counter() - start):.1f} img/s over {len(jpegs)} JPEGs, '
        f'TF {tf.__version__}', flush=True)


if __name__ == '__main__':
  main()
