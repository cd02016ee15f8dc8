"""The LPA routine per minibatch against the full step, in the paper's configuration.

The trainer's own step (steps.make_train_step, mode 'lpa') for `configs/cifar10.py:32px`
(8x2, D=192, reference style, dropout 0.1, Adam), one device: compile time of the LPA pass
step and of the full step, their median times, and the routine (one LPA pass step + one full
step, what an lpa epoch does per minibatch over its two passes) in full steps.

  .venv/bin/python benchmarks/lpa_routine.py [--batch=64] [--repeats=5]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import cifar10  # noqa: E402
from model_throughput import trainer_step  # noqa: E402
from paraformer_jax import run_state  # noqa: E402
from paraformer_jax.malloc import loaded_allocator  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  config = cifar10.get_config('32px')
  model = run_state.build_model(config)
  batch = {'image': jax.random.normal(jax.random.key(1), (args.batch, 32, 32, 3)),
           'label': jnp.arange(args.batch) % 10}
  step, [state] = trainer_step(model, batch['image'], mode='lpa', training=config.training)
  compile_s, run_s = {}, {}
  for lpa_pass in (True, False):
    start = time.perf_counter()
    state, metrics = step(state, batch, lpa_pass=lpa_pass)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      state, metrics = step(state, batch, lpa_pass=lpa_pass)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    run_s[lpa_pass] = statistics.median(times)
    compile_s[lpa_pass] = first - run_s[lpa_pass]
  print(f'{jax.default_backend()}, batch {args.batch}, dropout {model.dropout}, '
        f'{model.num_branches}x{model.branch_depth}, D={model.width}, malloc: {loaded_allocator()}')
  print(f'compile: LPA pass step {compile_s[True]:.1f} s, full step {compile_s[False]:.1f} s')
  print(f'LPA pass step {run_s[True]:.3f} s, full step {run_s[False]:.3f} s: the routine is '
        f'{(run_s[True] + run_s[False]) / run_s[False]:.2f} full steps; '
        f'{args.batch / (run_s[True] + run_s[False]):.2f} img/s')


if __name__ == '__main__':
  main()
