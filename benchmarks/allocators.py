"""The trainer's step under glibc's malloc and under tcmalloc or jemalloc (LD_PRELOAD).

XLA:CPU mallocs a compiled program's temporaries on every call. glibc serves each allocation
over 32 MiB with a fresh mmap and returns it to the kernel on free(), so every step
page-faults its working set in again (and the kernel zeroes it); an allocator that keeps
freed memory for the next call avoids that. An allocator is chosen when a process starts,
so each measurement is a child process, started with LD_PRELOAD set to the library (or not,
for glibc); the allocators take turns (`--rounds`) so that a busy machine slows all alike.
Each child times the trainer's own `lpa` step (steps.make_train_step) in the paper's setting
(`configs/cifar10.py:32px`: 8x2, reference style, batch 64, Adam): the full step at dropout
0 and at the config's 0.1, and the LPA pass step; calls round-robin after two warm-up
rounds. It counts the minor page faults per call (memory the kernel had to map in) and times
the three compiles.

  .venv/bin/python benchmarks/allocators.py [--rounds=2] [--steps=5] [--allocators=...]
On Debian/Ubuntu: apt install libtcmalloc-minimal4 (libjemalloc2 for jemalloc).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from paraformer_jax.malloc import loaded_allocator  # noqa: E402

LIBRARIES = {  # the Debian/Ubuntu packages' paths
    'tcmalloc': '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
    'jemalloc': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
}
# Allocator settings measured: (library, environment). tcmalloc gives free memory back to the
# kernel gradually; TCMALLOC_RELEASE_RATE=0 ("tcmalloc-keep") keeps it all.
VARIANTS = {
    'tcmalloc': ('tcmalloc', {}),
    'tcmalloc-keep': ('tcmalloc', {'TCMALLOC_RELEASE_RATE': '0'}),
    'jemalloc': ('jemalloc', {}),
}


def child(library: str, steps: int):
  """One process: JSON {call: (median ms, minor faults per call)} on stdout."""
  if loaded_allocator() != library:
    raise SystemExit(f'asked for {library} but {loaded_allocator()} is loaded')
  import jax
  import jax.numpy as jnp
  from configs import cifar10
  from model_throughput import trainer_step
  from paraformer_jax import run_state
  config = cifar10.get_config('32px')
  images = jax.random.normal(jax.random.key(0), (64, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(64) % 10}
  calls, compile_s = {}, 0.0
  for dropout in (0.0, config.model.dropout):
    with config.unlocked():
      config.model.dropout = dropout
    step, state = trainer_step(run_state.build_model(config), images, mode='lpa',
                               training=config.training)
    for lpa_pass in ((False, True) if dropout else (False,)):
      start = time.perf_counter()
      step.lower(state[0], batch, lpa_pass=lpa_pass).compile()
      compile_s += time.perf_counter() - start

      def call(step=step, state=state, lpa_pass=lpa_pass):
        state[0], metrics = step(state[0], batch, lpa_pass=lpa_pass)
        jax.block_until_ready(metrics)
      calls[f'{"LPA pass" if lpa_pass else "full step"}, dropout {dropout:g}'] = call
  # Two warm-up rounds: the first call of each program compiles it, and a second round
  # leaves the allocators' caches in their steady state before anything is timed.
  for _ in range(2):
    for call in calls.values():
      call()
  times = {name: [] for name in calls}
  faults = dict.fromkeys(calls, 0)
  for _ in range(steps):
    for name, call in calls.items():
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  out = {name: (1e3 * statistics.median(times[name]), faults[name] / steps) for name in calls}
  out['compile_s'] = compile_s
  out['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(out))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--allocators', default=','.join(VARIANTS),
                      help='comma-separated, of ' + ', '.join(map(repr, VARIANTS)) + ' (glibc '
                      'is always measured); those not installed are skipped')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child, args.steps)
  asked = [a for a in args.allocators.split(',') if a != 'glibc']
  unknown = sorted(set(asked) - set(VARIANTS))
  if unknown:
    parser.error(f'--allocators: unknown {", ".join(unknown)}; pick from {", ".join(VARIANTS)}')
  allocators = ['glibc'] + [a for a in asked if os.path.exists(LIBRARIES[VARIANTS[a][0]])]
  print(f'allocators: {", ".join(allocators)} (skipped, not installed: '
        f'{", ".join(sorted(set(asked) - set(allocators))) or "none"})')
  runs = {a: [] for a in allocators}
  for round_ in range(args.rounds):
    for allocator in allocators:
      env = dict(os.environ)
      env.pop('LD_PRELOAD', None)
      library = 'glibc'
      if allocator != 'glibc':
        library, settings = VARIANTS[allocator]
        env.update(settings, LD_PRELOAD=LIBRARIES[library])
      result = subprocess.run([sys.executable, __file__, f'--child={library}',
                               f'--steps={args.steps}'], env=env, capture_output=True,
                              text=True)
      if result.returncode:
        raise SystemExit(result.stderr[-3000:])
      runs[allocator].append(json.loads(result.stdout.strip().splitlines()[-1]))
      print(f'round {round_ + 1}/{args.rounds}, {allocator}: {runs[allocator][-1]}', flush=True)
  print(f'configs/cifar10.py:32px (8x2 reference, batch 64, Adam, lpa); {args.steps} calls '
        f'each per process, {args.rounds} processes per allocator; ms per call: median of '
        "the processes' medians (min..max); minor page faults per call: median")
  names = [k for k in runs[allocators[0]][0] if k not in ('compile_s', 'peak_rss_mib')]
  print('| call | ' + ' | '.join(f'{a}: ms | faults' for a in allocators) + ' |')
  print('|---|' + '---|---|' * len(allocators))
  medians = {}
  for name in names:
    cells = []
    for a in allocators:
      ms = [r[name][0] for r in runs[a]]
      medians[a, name] = statistics.median(ms)
      cells.append(f'{medians[a, name]:.0f} ({min(ms):.0f}..{max(ms):.0f}) | '
                   f'{statistics.median(r[name][1] for r in runs[a]):,.0f}')
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  for key, label in (('compile_s', 'compile, s (3 programs)'), ('peak_rss_mib', 'peak RSS, MiB')):
    print(f'{label}: ' + ', '.join(
        f'{a} {statistics.median(r[key] for r in runs[a]):,.0f}' for a in allocators))
  for a in allocators[1:]:
    print(f'{a} against glibc: ' + ', '.join(
        f'{name} {medians["glibc", name] / medians[a, name]:.2f}x' for name in names))


if __name__ == '__main__':
  main()
