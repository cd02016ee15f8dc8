"""Branch-parallel inference over processes: latency of one ParaFormer whose branches
are spread over 2 processes (jax.distributed on 127.0.0.1, gloo CPU collectives, one core
each), against the same model in one process on one core, and against a GPipe-style pipeline
of the sequential baseline (L=1, M=L*M) with its blocks split over the same 2 processes.

  .venv/bin/python benchmarks/branch_parallel.py                   # 32 px, patch 4, D=192
  .venv/bin/python benchmarks/branch_parallel.py --check           # small model: outputs only

Every multi-process result is checked against the same computation in one process before it
is timed (logits equal to 1e-4), so the script is also the loopback correctness check.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(kind, branches, depth, processes, args):
  """Runs `worker` in `processes` processes pinned to cores 0..; returns process 0's JSON."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = []
  for i in range(processes):
    cmd = [sys.executable, __file__, '--worker', kind, f'--branches={branches}',
           f'--depth={depth}', f'--processes={processes}', f'--process_id={i}',
           f'--port={port}', f'--repeats={args.repeats}', f'--batches={args.batches}',
           f'--image_size={args.image_size}', f'--width={args.width}',
           f'--micro_batch={args.micro_batch}']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f'{kind} worker failed:\n{err[-3000:]}')
  return json.loads(outs[0][0].strip().splitlines()[-1])


def _model_kwargs(args):
  return dict(num_classes=10, patch_size=4, width=args.width, num_heads=args.width // 64,
              mlp_dim=4 * args.width)


def _paraformer(args, mesh, images):
  """(forward(images), the same model's logits on `images` computed in this process alone)."""
  import jax
  from paraformer_jax import sharding
  from paraformer_jax.model import ParaFormer
  model = ParaFormer(num_branches=args.branches, branch_depth=args.depth, **_model_kwargs(args))
  key = jax.random.key(0)
  local = jax.jit(model.apply)
  reference = local({'params': model.init(key, images[:1])['params']}, images)
  if mesh is None:
    params = model.init(key, images[:1])['params']
    return lambda x: local({'params': params}, x), reference
  params = sharding.init_params(model, mesh, key, images.shape[1:])
  forward = jax.jit(sharding.sharded_apply(model, mesh))
  return lambda x: forward(params, sharding.global_batch(mesh, x)), reference


def _stage(args):
  """Half of the sequential baseline's blocks (a Flax module), for the pipeline."""
  import flax.linen as nn
  import jax.numpy as jnp
  from paraformer_jax.model import Block

  class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(args.depth // 2):
        x = Block(args.width // 64, 4 * args.width, 0.0, 'prenorm', jnp.float32,
                  name=f'block{i}')(x, True)
      return x
  return Stage()


def _pipeline(args, mesh, images):
  """GPipe over the 'branch' mesh axis used as the stage axis: stage 0 embeds and runs the
  first half of the blocks on micro-batch t while stage 1 runs the second half on t-1."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from paraformer_jax.model import Head, PatchEmbed

  kw = _model_kwargs(args)
  embed = PatchEmbed(kw['patch_size'], args.width, 0.0, False, jnp.float32)
  head = Head(kw['num_classes'], args.width, jnp.float32)
  stage = _stage(args)
  k = jax.random.split(jax.random.key(0), 4)
  # Host copies: constants of the compiled program, or placed on the mesh below.
  e_params = jax.device_get(embed.init(k[0], images[:1], True)['params'])
  tokens = embed.apply({'params': e_params}, images[:1], True)
  s_params = jax.device_get(jax.vmap(lambda key: stage.init(key, tokens)['params'])(k[1:3]))
  h_params = jax.device_get(head.init(k[3], tokens[:, 0])['params'])

  def sequential(x):  # the reference: both stages in this process
    y = embed.apply({'params': e_params}, x, True)
    for s in range(2):
      y = stage.apply({'params': jax.tree.map(lambda a: a[s], s_params)}, y)
    return head.apply({'params': h_params}, y[:, 0])
  reference = jax.jit(sequential)(images)

  def body(s_local, x):
    s_local = jax.tree.map(lambda a: a[0], s_local)
    me = jax.lax.axis_index('branch')
    micro = x.reshape((-1, min(args.micro_batch, x.shape[0])) + x.shape[1:])
    carry, outs = None, []
    for t in range(micro.shape[0] + 1):
      first = embed.apply({'params': e_params}, micro[min(t, micro.shape[0] - 1)], True)
      y = stage.apply({'params': s_local}, first if carry is None else
                      jnp.where(me == 0, first, carry))
      if t:
        outs.append(head.apply({'params': h_params}, y[:, 0]))
      carry = jax.lax.ppermute(y, 'branch', [(0, 1)])  # stage 0's output to stage 1
    logits = jnp.concatenate(outs)
    return jax.lax.psum(jnp.where(me == 1, logits, 0.0), 'branch')  # stage 1's, everywhere

  from paraformer_jax import sharding
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P('branch'), P()), out_specs=P()))
  by_stage = jax.sharding.NamedSharding(mesh, P('branch'))
  params = jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, by_stage,
                                                               lambda i: a[i]), s_params)
  return lambda x: fn(params, sharding.global_batch(mesh, x)), reference


def worker(args):
  os.sched_setaffinity(0, {args.process_id % os.cpu_count()})
  import jax
  import numpy as np
  from model_throughput import timed  # imported after pinning: it starts JAX
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  mesh = None
  if args.processes > 1:
    jax.distributed.initialize(f'127.0.0.1:{args.port}', args.processes, args.process_id)
    from paraformer_jax import sharding
    mesh = sharding.make_mesh(1, args.processes)
  batches = [int(b) for b in args.batches.split(',')]
  images = np.asarray(jax.random.normal(jax.random.key(1),
                                        (max(batches), args.image_size, args.image_size, 3)))
  build = _pipeline if args.worker == 'pipeline' else _paraformer
  result = {'max_abs_diff': 0.0}
  for b in batches:
    forward, reference = build(args, mesh, images[:b])
    got = np.asarray(forward(images[:b]).addressable_data(0))
    np.testing.assert_allclose(got, np.asarray(reference), rtol=1e-4, atol=1e-4)
    result['max_abs_diff'] = max(result['max_abs_diff'],
                                 float(np.abs(got - np.asarray(reference)).max()))
    result[b] = timed(lambda: forward(images[:b]), repeats=args.repeats)
  if args.process_id == 0:
    print(json.dumps(result))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--worker', choices=['paraformer', 'pipeline'])
  parser.add_argument('--branches', type=int, default=8)
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--batches', default='1,64')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--width', type=int, default=192)
  parser.add_argument('--micro_batch', type=int, default=16, help='pipeline micro-batch')
  parser.add_argument('--check', action='store_true',
                      help='a small model, few repeats: only the equality checks matter')
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  if args.check:
    args.image_size, args.width, args.repeats, args.batches, args.micro_batch = 8, 64, 1, '1,8', 4
  print(f'{args.image_size}px patch 4, D={args.width}, M=2 (baseline: L=1, M=2L); latency '
        f'in ms (median of {args.repeats}); 2 processes = one core each, 1 process = one core')
  batches = args.batches.split(',')
  print('| L | ' + ' | '.join(f'1 proc b{b} | 2 procs b{b} | pipeline 1x(2L) b{b}'
                               for b in batches) + ' |')
  print('|---|' + '---|---|---|' * len(batches))
  results = {}
  for L in (1, 2, 4, 8):
    one = _spawn('paraformer', L, 2, 1, args)
    two = _spawn('paraformer', L, 2, 2, args) if L % 2 == 0 else None
    pipe = _spawn('pipeline', 1, 2 * L, 2, args)
    results[L] = {'one': one, 'two': two, 'pipeline': pipe}
    ms = lambda r, b: '-' if r is None else f'{1e3 * r[b]:.1f}'
    print(f'| {L} | ' + ' | '.join(f'{ms(one, b)} | {ms(two, b)} | {ms(pipe, b)}'
                                   for b in batches) + ' |', flush=True)
  r8 = results[8]
  for b in batches:
    print(f'L=8 batch {b}: branch-parallel is {r8["one"][b] / r8["two"][b]:.2f}x faster than '
          f'one process, {r8["pipeline"][b] / r8["two"][b]:.2f}x faster than the pipeline')


if __name__ == '__main__':
  main()
