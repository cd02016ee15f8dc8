"""The real configs' train steps compiled by libtpu for TPU slices: memory per chip, verdict,
roofline (no TPU needed; the table of docs/benchmarks.md).

Each row is what `python -m paraformer_jax.aot --config=CONFIG --topology=SLICE FLAGS` prints,
compiled in this process one after another. The roofline is a lower bound on the step time
from XLA's count of the FLOPs and HBM bytes of the compiled program per device against the
chip's peak rates (`chips.CHIPS`): an estimate, never a measured time.

  .venv/bin/python benchmarks/tpu_programs.py            # every row (~20 min on 2 cores)
  .venv/bin/python benchmarks/tpu_programs.py --rows=0,2
"""
import argparse
import importlib
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the TPU, run nothing on it

from paraformer_jax import aot, chips  # noqa: E402

# (config[:variant], slice, overrides as --config flags would give them)
ROWS = [
    ('imagenet', 'v5e:4x4', {}),
    ('imagenet', 'v5e:4x4', {'model.num_branches': 1, 'model.branch_depth': 16,
                             'mesh.branch': 1}),
    ('imagenet', 'v4:2x2x2', {'mesh.branch': 8}),
    ('imagenet', 'v5p:2x2x1', {}),
    ('cifar10:32px', 'v5e:2x2', {}),
    ('cifar10', 'v5e:4x4', {}),
]


def load(name, overrides):
  module, _, variant = name.partition(':')
  get_config = importlib.import_module(f'configs.{module}').get_config
  config = get_config(variant) if variant else get_config()
  config.update_from_flattened_dict(overrides)
  return config


def row(name, topology, overrides):
  config = load(name, overrides)
  devices = aot.tpu_devices(topology)
  flags = ' '.join(f'--config.{k}={v}' for k, v in overrides.items())
  start = time.perf_counter()
  try:
    result = aot.compile_train_step(config, 3, devices)
  except ValueError as e:  # refused before compiling, e.g. a batch the data axis does not divide
    return (f'| {f"`{name}` {flags}".strip()} | {topology} | {config.training.mode} | '
            f'{config.training.batch_size} | refused: {e} |' + ' |' * 8)
  seconds = time.perf_counter() - start
  capacity = aot.chip_hbm_bytes(devices, topology)
  per_chip = aot.devices_per_chip(devices, topology)
  gib = lambda n: f'{n / 2**30:.3f}'
  cells = [f'`{name}` {flags}'.strip(), topology, config.training.mode,
           str(result['batch']), str(tuple(result['mesh'].values()))]
  if result['out_of_memory'] is not None:
    needed = result['out_of_memory']['needed_bytes']
    cells += ['', f'needs {gib(needed)}' if needed else 'refused', '', gib(capacity),
              'DOES NOT FIT', '', '']
  else:
    bound = aot.roofline(result, chips.lookup(result['device_kind']), per_chip)
    loops = f', {result["loops"]} loop(s): undercount' if result['loops'] else ''
    cells += [gib(result['argument_bytes']), gib(result['temp_bytes']),
              gib(result['peak_bytes']), gib(capacity),
              f'FITS ({100 * result["peak_bytes"] / capacity:.0f}%)' if aot.fits(
                  result, capacity) else 'DOES NOT FIT',
              f'{result["flops"]:.3g} / {result["bytes_accessed"]:.3g}',
              f'{1e3 * bound["bound_s"]:.1f} ms, {bound["bound_by"].split()[0]} '
              f'({bound["intensity"]:.0f} vs {bound["ridge"]:.0f}{loops})']
  return '| ' + ' | '.join(cells + [f'{seconds:.0f} s']) + ' |'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', default=None, help='comma-separated indices into ROWS')
  args = parser.parse_args()
  picked = [ROWS[int(i)] for i in args.rows.split(',')] if args.rows else ROWS
  print('| config and flags | slice | mode | global batch | mesh (data, branch) | arguments GiB '
        '| temporaries GiB | peak GiB | HBM per device GiB | verdict | FLOPs / HBM bytes per '
        'device | roofline bound (FLOPs per byte vs ridge) | compile |')
  print('|' + '---|' * 13)
  for name, topology, overrides in picked:
    print(row(name, topology, overrides), flush=True)


if __name__ == '__main__':
  main()
