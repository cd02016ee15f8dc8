"""A/B of model.py against its version at another commit, in one process, interleaved.

The trainer's own step (model_throughput.trainer_step: steps.make_train_step, mode 'joint',
Adam) at dropout 0 and 0.1, and inference at batch 1 and at --batch, for the 8x2 model in
the paper's 32 px setting. The baseline's model.py is read with `git show` and imported as a
module of its own; the rest of the package (steps, optim) is today's, so the baseline must
be recent enough to fit it.

  .venv/bin/python benchmarks/model_ab.py --baseline=cba40aa
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from model_throughput import trainer_step  # noqa: E402

from paraformer_jax import model as current  # noqa: E402


def load_model_module(commit):
  """paraformer_jax/model.py as of `commit`, imported as module `model_<commit>`."""
  source = subprocess.run(['git', 'show', f'{commit}:paraformer_jax/model.py'], cwd=REPO,
                          check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f'model_{commit}.py')
  with open(path, 'w') as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location(f'model_{commit}', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up
  spec.loader.exec_module(module)
  return module


def calls_for(module, args, images, batch):
  """{kind: no-argument call} for the 8x2 model of `module`."""
  calls = {}
  for dropout in (0.0, 0.1):
    model = module.ParaFormer(num_classes=10, num_branches=8, branch_depth=2, width=192,
                              num_heads=3, mlp_dim=768, patch_size=4,
                              block_style=args.block_style, dropout=dropout)
    step, state = trainer_step(model, images)

    def train(step=step, state=state):
      state[0], _ = step(state[0], batch)
      return state[0].params
    calls[f'train dropout {dropout:g}'] = train
  # Inference is deterministic: the last model built (dropout 0.1) stands for both.
  infer = jax.jit(lambda p, x: model.apply({'params': p}, x))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']  # the steps donate
  calls['infer b1'] = lambda: infer(params, images[:1])
  calls[f'infer b{args.batch}'] = lambda: infer(params, images)
  return calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--baseline', required=True, help='a commit, e.g. cba40aa')
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--block_style', default='reference', choices=['prenorm', 'reference'])
  args = parser.parse_args()
  images = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(args.batch) % 10}
  versions = {args.baseline: load_model_module(args.baseline), 'working tree': current}
  calls = {(v, kind): fn for v, module in versions.items()
           for kind, fn in calls_for(module, args, images, batch).items()}
  for fn in calls.values():
    for _ in range(2):  # compile and warm up: a train step's second call took up to 8x
      jax.block_until_ready(fn())  # the later ones
  times = {k: [] for k in calls}
  for _ in range(args.rounds):
    for key, fn in calls.items():
      # Batch-1 calls are short: 20 of them per round.
      for _ in range(20 if key[1] == 'infer b1' else 1):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[key].append(time.perf_counter() - start)
  print(f'{args.block_style} 8x2, batch {args.batch}, 32 px; ms per call, median (min..max) '
        f'of {args.rounds} rounds')
  print(f'| call | {args.baseline} | working tree | speed-up |')
  print('|---|---|---|---|')
  kinds = dict.fromkeys(kind for _, kind in calls)
  for kind in kinds:
    a, b = times[args.baseline, kind], times['working tree', kind]
    cell = lambda t: (f'{1e3 * statistics.median(t):.1f} '
                      f'({1e3 * min(t):.1f}..{1e3 * max(t):.1f})')
    print(f'| {kind} | {cell(a)} | {cell(b)} | '
          f'{statistics.median(a) / statistics.median(b):.3f}x |')


if __name__ == '__main__':
  main()
