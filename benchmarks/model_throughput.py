"""Training and inference throughput: ParaFormer 8x2 against the sequential 1x16 baseline.

Everything is measured in one run, the matmul peak included, so that ratios are not spoiled by
a busy shared machine. FLOPs are counted analytically (paraformer_jax/flops.py).

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
import optax

from paraformer_jax.flops import forward_flops
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


def matmul_peak(dtype, n=4096, repeats=5):
  """GFLOP/s of a jitted n x n matmul (f32 accumulation)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / timed(mm, a, b, repeats=repeats) / 1e9


def make_train_step(model, tx):
  def loss_fn(params, images, labels):
    logits = model.apply({'params': params}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, images, labels):
    grads = jax.grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


def bench_model(model, args):
  shape = (args.image_size, args.image_size, 3)
  images = jax.random.normal(jax.random.key(0), (args.batch, *shape))
  labels = jnp.arange(args.batch) % model.num_classes
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  tx = optax.adam(1e-4)
  opt_state = tx.init(params)
  step = make_train_step(model, tx)
  state = [params, opt_state]

  def train(images, labels):  # keeps donated buffers threaded through the repeats
    state[:] = step(*state, images, labels)
    return state[0]

  infer = jax.jit(lambda p, x: model.apply({'params': p}, x))
  flops = forward_flops(model, args.image_size)
  row = {'train_s': timed(train, images, labels, repeats=args.repeats)}
  row['infer_s'] = timed(infer, state[0], images, repeats=args.repeats)
  row['infer1_s'] = timed(infer, state[0], images[:1], repeats=4 * args.repeats)
  row['train_ips'] = args.batch / row['train_s']
  row['train_gflops'] = 3 * flops * row['train_ips'] / 1e9
  row['infer_ips'] = args.batch / row['infer_s']
  row['infer_gflops'] = flops * row['infer_ips'] / 1e9
  row['infer1_gflops'] = flops / row['infer1_s'] / 1e9
  return flops, row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--patch_size', type=int, default=4)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--strategies', default='scan,vmap',
                      help='comma-separated branch strategies to measure for the 8x2 model')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)

  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'{args.image_size}px patch {args.patch_size}, batch {args.batch}, compute {args.dtype}')
  peak = {d: matmul_peak(jnp.dtype(d)) for d in ('float32', 'bfloat16')}
  print(f'matmul 4096^2 peak: f32 {peak["float32"]:.0f} GFLOP/s, '
        f'bf16 {peak["bfloat16"]:.0f} GFLOP/s')
  ref = peak['float32']
  print(f'| model | GFLOP/img fwd | train img/s | train GFLOP/s (% f32 peak) | '
        f'infer b{args.batch} img/s (GFLOP/s) | infer b1 ms (GFLOP/s, % f32 peak) |')
  print('|---|---|---|---|---|---|')
  runs = [(8, 2, s) for s in args.strategies.split(',')] + [(1, 16, 'scan')]
  for branches, depth, strategy in runs:
    model = ParaFormer(num_classes=10, patch_size=args.patch_size, width=192, num_heads=3,
                       mlp_dim=768, num_branches=branches, branch_depth=depth, dtype=dtype,
                       branch_strategy=strategy)
    flops, r = bench_model(model, args)
    name = f'{branches}x{depth}' + (f' {strategy}' if branches > 1 else '')
    print(f'| {name} | {flops / 1e9:.3f} | {r["train_ips"]:.1f} | '
          f'{r["train_gflops"]:.0f} ({100 * r["train_gflops"] / ref:.0f}%) | '
          f'{r["infer_ips"]:.1f} ({r["infer_gflops"]:.0f}) | {1e3 * r["infer1_s"]:.1f} '
          f'({r["infer1_gflops"]:.0f}, {100 * r["infer1_gflops"] / ref:.0f}%) |', flush=True)
  print(f'matmul peak again at the end: f32 {matmul_peak(jnp.float32):.0f} GFLOP/s')


if __name__ == '__main__':
  main()
