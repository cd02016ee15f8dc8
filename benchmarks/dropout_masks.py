"""Dropout mask cost: threefry for every word (the old keep_mask) against model.keep_mask's
keyed hash, on the 32 px model's largest mask ([64, 65, 768], the MLP hidden layer), each
applied as dropout does (select and scale). Interleaved calls, medians.

  .venv/bin/python benchmarks/dropout_masks.py [--repeats=15]
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from paraformer_jax import model  # noqa: E402

SHAPE, RATE = (65, 768), 0.1


def threefry_mask(key, rows):
  """The mask drawn with threefry for every word (two 16-bit draws per 32-bit word), the
  way keep_mask drew it before its keyed hash."""
  threshold, n = round(RATE * model.DROPOUT_LEVELS), math.prod(SHAPE)

  def row_mask(row):
    words = jax.random.bits(jax.random.fold_in(key, row), (-(-n // 2),), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    return draws.reshape(SHAPE) >= threshold
  return jax.vmap(row_mask)(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=15)
  args = parser.parse_args()
  rows, x = jnp.arange(64), jnp.ones((64,) + SHAPE)
  masks = {'threefry': threefry_mask,
           'keyed hash (model.keep_mask)': lambda k, r: model.keep_mask(k, r, RATE, SHAPE)[0]}
  fns = {name: jax.jit(lambda k, x, mask=mask: jnp.where(mask(k, rows), x / (1 - RATE), 0))
         for name, mask in masks.items()}
  for fn in fns.values():
    fn(jax.random.key(0), x).block_until_ready()
  times = {name: [] for name in fns}
  for r in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(jax.random.key(r), x).block_until_ready()
      times[name].append(time.perf_counter() - start)
  for name, t in times.items():
    print(f'{name}: {1e3 * statistics.median(t):.1f} ms (median of {args.repeats})')


if __name__ == '__main__':
  main()
