"""Branch strategies: each way of running the 8x2 branch stack against the sequential
1x16 baseline, inference at several batch sizes and a training step, with compiled memory.

Everything is timed round-robin in one run, the f32 matmul peak included (see
model_throughput.py). Peak memory is XLA's own figure for the compiled program: arguments +
outputs + temporaries (`Compiled.memory_analysis()`), not the process's RSS.

  .venv/bin/python benchmarks/branch_strategies.py                     # 32 px, patch 4, f32
  .venv/bin/python benchmarks/branch_strategies.py --image_size=224 --patch_size=16 \\
      --dtype=bfloat16 --batches=1,64,256                              # on a GPU
"""
import argparse

import jax
import jax.numpy as jnp

from model_throughput import interleaved, matmul_peak, trainer_step
from paraformer_jax.flops import forward_flops
from paraformer_jax.model import ParaFormer


def compiled_bytes(jitted, *args):
  m = jitted.lower(*args).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def executed_flops(model, params, images):
  """FLOPs per image that XLA counts in the compiled forward: below the analytic count where
  work is skipped (a branch's last block computes one token under cls pooling). Counted on
  the unrolled program, the same math as every strategy: XLA counts a loop body once."""
  model = model.clone(branch_strategy='unrolled')
  infer = jax.jit(lambda p, x: model.apply({'params': p}, x))
  cost = infer.lower(params, images).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops'] / images.shape[0]


def model_calls(model, args, batches, train_batch):
  """{(kind, batch): (no-argument call, compiled bytes)} for inference and one train step."""
  shape = (args.image_size, args.image_size, 3)
  images = jax.random.normal(jax.random.key(0), (max(batches + [train_batch]), *shape))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  infer = jax.jit(lambda p, x: model.apply({'params': p}, x))
  calls = {'xla_flops': executed_flops(model, params, images[:batches[-1]])}
  for b in batches:
    x = images[:b]
    calls['infer', b] = (lambda x=x: infer(params, x)), compiled_bytes(infer, params, x)
  if train_batch:
    x = images[:train_batch]
    step, state = trainer_step(model, x)  # the trainer's own step
    batch = {'image': x, 'label': jnp.arange(train_batch) % model.num_classes}
    memory = compiled_bytes(step, state[0], batch)

    def train():  # threads the donated state through the repeats
      state[0], _ = step(state[0], batch)
      return state[0].params
    calls['train', train_batch] = train, memory
  return calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--patch_size', type=int, default=4)
  parser.add_argument('--batches', default='1,64,256', help='inference batch sizes')
  parser.add_argument('--train_batch', type=int, default=64, help='0: no training step')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--strategies', default='auto,vmap,scan,unrolled,fused')
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(',')]

  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'{args.image_size}px patch {args.patch_size}, compute {args.dtype}')
  peak_dtype = jnp.dtype(args.dtype)
  peak = matmul_peak(peak_dtype)
  print(f'matmul 4096^2 peak ({args.dtype}): {peak:.0f} GFLOP/s')
  runs = {f'8x2 {s}': (8, 2, s) for s in args.strategies.split(',')}
  sequential = '1x16 (sequential)'
  runs[sequential] = (1, 16, 'auto')
  calls, memory, flops, xla_flops = {}, {}, {}, {}
  for name, (branches, depth, strategy) in runs.items():
    model = ParaFormer(num_classes=10, patch_size=args.patch_size, width=192, num_heads=3,
                       mlp_dim=768, num_branches=branches, branch_depth=depth,
                       dtype=peak_dtype, branch_strategy=strategy)
    flops[name] = forward_flops(model, args.image_size)
    measured = model_calls(model, args, batches, args.train_batch)
    xla_flops[name] = measured.pop('xla_flops')
    for key, (fn, nbytes) in measured.items():
      calls[name, key] = fn
      memory[name, key] = nbytes
  kinds = [('infer', b) for b in batches] + ([('train', args.train_batch)]
                                             if args.train_batch else [])
  # Round-robin within one kind of call: big training steps between batch-1 calls slow
  # those down (measured 5x), which would blur the comparison between models.
  t = {}
  for kind in kinds:
    t.update(interleaved({k: fn for k, fn in calls.items() if k[1] == kind}, args.repeats))
  print('\nimg/s (analytic GFLOP/s, % peak) [compiled MiB, x sequential]; '
        'training = 3x forward FLOPs')
  print('| model | ' + ' | '.join(f'{k} b{b}' for k, b in kinds) + ' |')
  print('|---|' + '---|' * len(kinds))
  for name in runs:
    cells = []
    for kind, b in kinds:
      ips = b / t[name, (kind, b)]
      gf = (3 if kind == 'train' else 1) * flops[name] * ips / 1e9
      mem = memory[name, (kind, b)]
      cells.append(f'{ips:.1f} ({gf:.0f}, {100 * gf / peak:.0f}%) [{mem / 2**20:.0f}, '
                   f'{mem / memory[sequential, (kind, b)]:.2f}x]')
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)
  print('\nforward GFLOP per image: analytic (used above) vs counted by XLA in the program')
  for name in runs:
    print(f'  {name}: {flops[name] / 1e9:.3f} vs {xla_flops[name] / 1e9:.3f}')
  print(f'matmul peak again at the end: {matmul_peak(peak_dtype):.0f} GFLOP/s')


if __name__ == '__main__':
  main()
