"""Where a training step's (or a forward pass's) time goes, op by op, on this backend.

Traces a few calls with jax.profiler and sums the time of every compiled op, grouped by the
kind of op, its output shape and the model code that produced it (XLA's op_name metadata).
The times are summed over the executor's threads, so on a 2-core CPU they add up to about
twice the wall time per call. This is how the qkv derivative and the GELU of
paraformer_jax/model.py were found (docs/benchmarks.md).

  .venv/bin/python benchmarks/profile_step.py                    # 8x2 training step, batch 64
  .venv/bin/python benchmarks/profile_step.py --dropout=0 --block_style=prenorm
  .venv/bin/python benchmarks/profile_step.py --mode=infer --batch=1
  .venv/bin/python benchmarks/profile_step.py --matmuls    # the step's matmul shapes, alone
"""
import argparse
import collections
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from model_throughput import matmul_peak, timed, trainer_step
from paraformer_jax.model import ParaFormer


def op_times(trace_dir, calls):
  """{op name: seconds per call} over every thread of the trace."""
  path = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0]
  totals = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for event in line.events:
        totals[event.name] += event.duration_ns / 1e9 / calls
  return totals


def op_labels(hlo_text):
  """{op name: (output shape, model code)} from a compiled module's HLO text."""
  labels = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name="([^"]*)"', hlo_text,
                       re.M):
    code = re.sub(r'^jit\([^)]*\)/|ParaFormer\.pooled_branch_outputs/|branches/'
                  r'|closed_call/|branch\.<lambda>/|(vmap\()?branch\)?/', '', m.group(3))
    labels[m.group(1)] = (m.group(2), re.sub(r'block\d+', 'blockN', code))
  return labels


def matmul_shapes(tokens: int):
  """GFLOP/s of the training step's matmul shapes (D=192, MLP 768, `tokens` rows), each
  jitted alone: forward x @ W, and the weight gradient x^T @ dy."""
  print(f'matmul 4096^2 peak: f32 {matmul_peak(jnp.float32):.0f} GFLOP/s')
  key = jax.random.key(0)
  for k, n in ((192, 576), (192, 768), (768, 192), (192, 192)):
    x, w = jax.random.normal(key, (tokens, k)), jax.random.normal(key, (k, n))
    dy = jax.random.normal(key, (tokens, n))
    fwd = timed(jax.jit(lambda a, b: a @ b), x, w, repeats=20)
    grad = timed(jax.jit(lambda a, b: a.T @ b), x, dy, repeats=20)
    flop = 2 * tokens * k * n
    print(f'{tokens}x{k} @ {k}x{n}: {flop / fwd / 1e9:.0f} GFLOP/s; weight gradient '
          f'{k}x{tokens} @ {tokens}x{n}: {flop / grad / 1e9:.0f} GFLOP/s')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mode', default='train', choices=['train', 'infer'])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--branches', type=int, default=8)
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--strategy', default='auto')
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--block_style', default='reference', choices=['prenorm', 'reference'])
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--matmuls', action='store_true',
                      help="time the 8x2 step's matmul shapes alone instead, against the peak")
  args = parser.parse_args()
  if args.matmuls:
    return matmul_shapes(args.batch * 65)

  model = ParaFormer(num_classes=10, num_branches=args.branches, branch_depth=args.depth,
                     branch_strategy=args.strategy, block_style=args.block_style,
                     dropout=args.dropout)
  images = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(args.batch) % 10}
  step, state = trainer_step(model, images)
  if args.mode == 'train':
    hlo = step.lower(state[0], batch).compile().as_text()

    def call():
      state[0], _ = step(state[0], batch)
      return state[0].params
  else:
    infer = jax.jit(lambda p, x: model.apply({'params': p}, x))
    hlo = infer.lower(state[0].params, images).compile().as_text()
    call = lambda: infer(state[0].params, images)
  for _ in range(2):
    jax.block_until_ready(call())  # compile, warm up
  start = time.perf_counter()
  for _ in range(args.calls):
    jax.block_until_ready(call())
  wall = (time.perf_counter() - start) / args.calls
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.calls):
        jax.block_until_ready(call())
    times = op_times(trace_dir, args.calls)

  labels = op_labels(hlo)
  groups, counts = collections.Counter(), collections.Counter()
  for name, seconds in times.items():
    if name in labels:
      key = (re.sub(r'\.\d+$', '', name),) + labels[name]
      groups[key] += seconds
      counts[key] += 1
  print(f'{args.branches}x{args.depth} {args.strategy}, {args.mode} at batch {args.batch}: '
        f'{1e3 * wall:.1f} ms per call (untraced); ops below sum '
        f'{1e3 * sum(groups.values()):.0f} ms of thread time per call')
  print('| ms per call | ops | kind | output | model code |\n|---|---|---|---|---|')
  for (kind, shape, code), seconds in groups.most_common(args.top):
    print(f'| {1e3 * seconds:.1f} | {counts[kind, shape, code]} | {kind} | {shape} | {code} |')


if __name__ == '__main__':
  main()
