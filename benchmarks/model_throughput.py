"""Training and inference throughput: ParaFormer 8x2 against the sequential 1x16 baseline.

Everything is measured in one run, the matmul peak included, so that ratios are not spoiled by
a busy shared machine. FLOPs are counted analytically (paraformer_jax/flops.py). Training is
timed with the trainer's own step (steps.make_train_step, mode 'joint') at each `--dropouts`
rate (0.1 is the paper's), in `--block_style` (the paper's is 'reference').

  .venv/bin/python benchmarks/model_throughput.py                      # 32 px, patch 4, f32
  .venv/bin/python benchmarks/model_throughput.py --dtype=bfloat16
  .venv/bin/python benchmarks/model_throughput.py --image_size=224 --patch_size=16 \
      --dtype=bfloat16 --batch=128                                      # on a GPU
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections

from paraformer_jax import optim, run_state, sharding, steps
from paraformer_jax.flops import forward_flops
from paraformer_jax.malloc import loaded_allocator
from paraformer_jax.model import ParaFormer


def timed(fn, *args, repeats):
  """Median seconds per call after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved(calls, repeats):
  """{name: median seconds} of no-argument calls timed round-robin.

  Alternating the models inside each round spreads the load of a shared machine over all
  of them, so their ratios stay meaningful even when absolute numbers drift.
  """
  for fn in calls.values():
    jax.block_until_ready(fn())  # compile
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype, n=4096, repeats=5):
  """GFLOP/s of a jitted n x n matmul (f32 accumulation)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / timed(mm, a, b, repeats=repeats) / 1e9


def trainer_step(model, images, lr=1e-4, mode='joint', training=None, params=None):
  """(step, [state]) for images of this shape: the trainer's own step (steps.make_train_step,
  `mode`, the model's dropout) on one device, and its initial TrainState over `params` (by
  default freshly initialized). The optimizer is `training`'s (a config's `training` block) or
  else the trainer's Adam at `lr` with a cosine schedule. `call()` below threads the donated
  state through repeats."""
  if params is None:
    params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  if training is None:
    training = ml_collections.ConfigDict({'learning_rate': lr, 'schedule': 'cosine',
                                          'optimizer': 'adam'})
  tx = optim.make_tx(training, steps_per_stage=1000)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  return steps.make_train_step(model, mesh, tx, mode), [initial_state(params, tx, mesh)]


def initial_state(params, tx, mesh, frozen_keys=()):
  """A fresh TrainState over `params`, laid out over `mesh` as the trainer lays out its own
  (run_state.state_shardings): an unplaced state's first call compiles the step again."""
  trained, _ = steps.split_params(params, frozen_keys)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optim.init(tx, trained), rng=jax.random.PRNGKey(0))
  return jax.device_put(state, run_state.state_shardings(state, mesh))


def train_call(model, images):
  """(a no-argument call making one training step on `images` (labels 0..9 cycled), the
  state list, the FLOPs XLA executes per step by its own count of the compiled step)."""
  step, state = trainer_step(model, images)
  batch = {'image': images, 'label': jnp.arange(images.shape[0]) % model.num_classes}
  executed = step.lower(state[0], batch).compile().cost_analysis()['flops']

  def call():
    state[0], _ = step(state[0], batch)
    return state[0].params
  return call, state, executed


def model_calls(model, args):
  """No-argument calls: a training step at --batch, inference at --batch and at batch 1."""
  shape = (args.image_size, args.image_size, 3)
  images = jax.random.normal(jax.random.key(0), (args.batch, *shape))
  train, state, executed = train_call(model, images)
  infer = jax.jit(lambda p, x: model.apply({'params': p}, x))
  return {'train': train, 'infer': lambda: infer(state[0].params, images),
          'infer1': lambda: infer(state[0].params, images[:1])}, executed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--patch_size', type=int, default=4)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--strategies', default='auto,vmap',
                      help='comma-separated branch strategies to measure for the 8x2 model')
  parser.add_argument('--dropouts', default='0.0,0.1', help='comma-separated dropout rates')
  parser.add_argument('--block_style', default='prenorm', choices=['prenorm', 'reference'])
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)

  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'{args.image_size}px patch {args.patch_size}, batch {args.batch}, compute {args.dtype}, '
        f'malloc: {loaded_allocator()}')
  peak = {d: matmul_peak(jnp.dtype(d)) for d in ('float32', 'bfloat16')}
  print(f'matmul 4096^2 peak: f32 {peak["float32"]:.0f} GFLOP/s, '
        f'bf16 {peak["bfloat16"]:.0f} GFLOP/s')
  ref = peak['float32']
  print(f'| model | GFLOP/img fwd | train img/s | train GFLOP/s (% f32 peak) | train executed '
        f'GFLOP/s (% f32 peak) | infer b{args.batch} img/s (GFLOP/s) | '
        f'infer b1 ms (GFLOP/s, % f32 peak) |')
  print('|---|---|---|---|---|---|---|')
  runs = [(8, 2, s, float(p)) for p in args.dropouts.split(',')
          for s in args.strategies.split(',')]
  runs += [(1, 16, 'auto', float(p)) for p in args.dropouts.split(',')]
  calls, flops, executed = {}, {}, {}
  for branches, depth, strategy, dropout in runs:
    model = ParaFormer(num_classes=10, patch_size=args.patch_size, width=192, num_heads=3,
                       mlp_dim=768, num_branches=branches, branch_depth=depth, dtype=dtype,
                       branch_strategy=strategy, dropout=dropout,
                       block_style=args.block_style)
    name = (f'{branches}x{depth}' + (f' {strategy}' if branches > 1 else '') +
            f' dropout {dropout:g}')
    flops[name] = forward_flops(model, args.image_size)
    made, executed[name] = model_calls(model, args)
    calls.update({(name, kind): fn for kind, fn in made.items()})
  # Batch-1 calls are timed among themselves: between big training steps they ran up to 5x
  # slower (caches and the thread pool wake up cold), which is not the latency a user sees.
  t = interleaved({k: f for k, f in calls.items() if k[1] != 'infer1'}, args.repeats)
  t.update(interleaved({k: f for k, f in calls.items() if k[1] == 'infer1'}, 10 * args.repeats))
  for name in flops:
    f = flops[name]
    train_ips = args.batch / t[name, 'train']
    infer_ips = args.batch / t[name, 'infer']
    train_gf, infer_gf = 3 * f * train_ips / 1e9, f * infer_ips / 1e9
    exec_gf = executed[name] / t[name, 'train'] / 1e9
    infer1_gf = f / t[name, 'infer1'] / 1e9
    print(f'| {name} | {f / 1e9:.3f} | {train_ips:.1f} | {train_gf:.0f} '
          f'({100 * train_gf / ref:.0f}%) | {exec_gf:.0f} ({100 * exec_gf / ref:.0f}%) | '
          f'{infer_ips:.1f} ({infer_gf:.0f}) | '
          f'{1e3 * t[name, "infer1"]:.1f} ({infer1_gf:.0f}, {100 * infer1_gf / ref:.0f}%) |',
          flush=True)
  print(f'matmul peak again at the end: f32 {matmul_peak(jnp.float32):.0f} GFLOP/s')


if __name__ == '__main__':
  main()
