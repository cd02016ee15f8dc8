"""Dropout's cost, two A/Bs in one process, interleaved calls, medians.

1. The mask: threefry for every word (the old keep_mask) against model.keep_mask's keyed
   hash, on the 32 px model's largest mask ([64, 65, 768], the MLP hidden layer), each
   applied as dropout does (select and scale).
2. The backward pass: the trainer's own steps (steps.make_train_step, `configs/cifar10.py:32px`,
   the paper's configuration: reference style, dropout 0.1, 8x2, batch 64, `lpa`: LPA pass
   and full pass) with dropout differentiated by autodiff (the mask saved for the backward
   pass) against model.dropout's custom VJP (the mask drawn again).

  .venv/bin/python benchmarks/dropout_masks.py [--repeats=15] [--step_repeats=5]
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

from configs import cifar10  # noqa: E402
from paraformer_jax import model, optim, run_state, sharding, steps  # noqa: E402

SHAPE, RATE = (65, 768), 0.1


def threefry_mask(key, rows):
  """Session 5's keep_mask: two 16-bit draws per 32-bit word of threefry."""
  threshold, n = round(RATE * model.DROPOUT_LEVELS), math.prod(SHAPE)

  def row_mask(row):
    words = jax.random.bits(jax.random.fold_in(key, row), (-(-n // 2),), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    return draws.reshape(SHAPE) >= threshold
  return jax.vmap(row_mask)(rows)


def saved_mask_dropout(x, key, rows, rate):
  """Dropout as autodiff differentiates it: the mask is a residual of the forward pass."""
  keep, keep_prob = model.keep_mask(key, rows, rate, x.shape[1:])
  return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)


def interleaved(calls, repeats):
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def mask_calls():
  rows, x = jnp.arange(64), jnp.ones((64,) + SHAPE)
  masks = {'threefry': threefry_mask,
           'keyed hash (model.keep_mask)': lambda k, r: model.keep_mask(k, r, RATE, SHAPE)[0]}
  fns = {name: jax.jit(lambda k, x, mask=mask: jnp.where(mask(k, rows), x / (1 - RATE), 0))
         for name, mask in masks.items()}
  keys = iter(range(10 ** 6))
  return {name: lambda fn=fn: fn(jax.random.key(next(keys)), x) for name, fn in fns.items()}


def lpa_step_calls(dropout_fn):
  """(LPA pass step, full step, {lpa_pass: temporary buffers in MiB}) of the trainer's lpa
  step, compiled with `dropout_fn` as model.dropout (the module global that model.Dropout
  calls when traced)."""
  config = cifar10.get_config('32px')
  net = run_state.build_model(config)
  batch = {'image': jax.random.normal(jax.random.key(1), (64, 32, 32, 3)),
           'label': jnp.arange(64) % 10}
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  tx = optim.make_tx(config.training, 1000)
  params = net.init(jax.random.key(0), batch['image'][:1])['params']
  state = [steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optim.init(tx, params), rng=jax.random.PRNGKey(0))]
  step = steps.make_train_step(net, mesh, tx, 'lpa')
  original, model.dropout = model.dropout, dropout_fn
  try:
    compiled = {p: step.lower(state[0], batch, lpa_pass=p).compile() for p in (True, False)}
  finally:
    model.dropout = original

  def call(lpa_pass):
    state[0], metrics = compiled[lpa_pass](state[0], batch)
    return metrics
  temp = {p: c.memory_analysis().temp_size_in_bytes / 2 ** 20 for p, c in compiled.items()}
  return (lambda: call(True)), (lambda: call(False)), temp


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--step_repeats', type=int, default=5)
  args = parser.parse_args()
  calls = mask_calls()
  for call in calls.values():
    call()
  for name, t in interleaved(calls, args.repeats).items():
    print(f'mask {name}: {1e3 * t:.1f} ms (median of {args.repeats})')
  calls, temp = {}, {}
  for name, fn in (('mask saved (autodiff)', saved_mask_dropout),
                   ('mask drawn again (model.dropout)', model.dropout)):
    calls[name, 'LPA pass'], calls[name, 'full'], temp[name] = lpa_step_calls(fn)
  for call in calls.values():
    call()
  t = interleaved(calls, args.step_repeats)
  for name in dict.fromkeys(n for n, _ in calls):
    lpa, full = t[name, 'LPA pass'], t[name, 'full']
    print(f'lpa steps, {name}: LPA pass {lpa:.3f} s, full {full:.3f} s, routine '
          f'{lpa + full:.3f} s (median of {args.step_repeats}); temporary memory (XLA): LPA '
          f'pass {temp[name][True]:.0f} MiB, full {temp[name][False]:.0f} MiB')


if __name__ == '__main__':
  main()
