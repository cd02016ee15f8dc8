"""Ahead-of-time check: compile one train step for a config and its target, with no data.

  python -m paraformer_jax.aot --config=configs/imagenet.py --topology=v5e:4x4
  python -m paraformer_jax.aot --config=configs/imagenet.py --topology=v4:2x2x2 --max_batch
  python -m paraformer_jax.aot --config=configs/cifar10.py --config.mesh.branch=4 --devices=8

`--topology` compiles with the real TPU compiler (libtpu's topology descriptions need no
TPU: `pip install 'jax[tpu]==<this jax>'`), for every chip of a slice: shapes, shardings,
the branch strategy and attention the TPU runs, and an exact per-chip memory figure, set
against the chip's HBM for a fits / does-not-fit verdict. `--max_batch` also finds the
largest global batch that fits (a guess from two compiles, then bisection). `--devices=N`
compiles for N CPU stand-ins instead: shapes and shardings are the real run's, memory is
XLA:CPU's. Without either, this machine's devices.

XLA's FLOP count for a TPU program counts loop bodies once and its 'optimal_seconds' is not
a time: neither is reported as a step time.
"""
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

# HBM per chip (GiB), by the device_kind JAX reports (Cloud TPU documentation).
CHIP_HBM_GIB = {'TPU v2': 16, 'TPU v3': 32, 'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95,
                'TPU v6 lite': 32, 'TPU7x': 192}
TOPOLOGY_EXAMPLES = 'v5e:2x2, v5e:4x4, v4:2x2x1, v4:2x2x2, v5p:2x2x1, v6e:2x2'


def define_flags():
  """Only when run as a program: importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_string('topology', None, f'Compile for this TPU slice ({TOPOLOGY_EXAMPLES}).')
  flags.DEFINE_bool('max_batch', False, 'Also find the largest global batch that fits.')
  flags.DEFINE_integer('devices', 0, 'Compile for this many fake CPU devices (0: real devices).')
  flags.DEFINE_integer('channels', 3, 'Image channels.')
  flags.mark_flags_as_required(['config'])


def tpu_devices(topology: str):
  """The devices of a TPU slice, from libtpu's description of it (no TPU needed)."""
  if importlib.util.find_spec('libtpu') is None:
    import jax
    raise ImportError(f'--topology needs libtpu, the TPU compiler: pip install '
                      f'"jax[tpu]=={jax.__version__}"')
  # No TPU is used, only its compiler: let several processes load libtpu at once (its lock
  # file otherwise makes a second compile, e.g. a test beside a running check, fail).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=topology, platform='tpu').devices
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f'--topology={topology!r}: libtpu refused it ('
                     f'{str(e).splitlines()[0]}). Write GENERATION:CHIPS, with the chips of '
                     f'the slice as AxB (v5e, v6e) or AxBxC (v4, v5p) in multiples of the '
                     f'chips per host, e.g. {TOPOLOGY_EXAMPLES}.') from e


def chip_hbm_bytes(devices, topology: str) -> int | None:
  """HBM of one device: the chip's, shared by the devices (cores) on it."""
  gib = CHIP_HBM_GIB.get(devices[0].device_kind)
  if gib is None:
    return None
  chips = 1
  for n in topology.split(':')[-1].split('x'):
    chips *= int(n)
  return gib * 2**30 * chips // len(devices)


def compile_train_step(config, channels: int = 3, devices=None, batch: int | None = None):
  """Lowers and compiles the heaviest train step of `config` on its mesh over `devices`
  (default: this machine's); returns the lowered program's text and the figures."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from paraformer_jax import optim, run_state, sharding, steps, train

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.branch, devices)
  batch = batch or config.training.batch_size
  train.check_config(config, mesh)
  sharding.check_divisible(run_state.build_model(config), mesh, batch)
  plan = run_state.StagePlan(config, steps_per_epoch=1000)
  stage = plan.num_stages - 1  # stagewise: the last stage holds the most branches
  tx = optim.make_tx(config.training, plan.steps_per_stage, plan.warmup_steps)
  size = config.data.image_size
  state = run_state.abstract_state(plan, tx, mesh, stage, (size, size, channels))
  data = NamedSharding(mesh, P('data'))
  images = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32, sharding=data)
  d = config.data
  # The batch as input_pipeline.finish hands it over: soft labels when mixing.
  labels = (jax.ShapeDtypeStruct((batch, d.num_classes), jnp.float32, sharding=data)
            if d.mixup or d.cutmix else jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data))
  mask = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=data)
  model = plan.model(stage)
  step = steps.make_train_step(model, mesh, tx, config.training.mode, plan.frozen_keys(stage),
                               config.training.clip_norm,
                               label_smoothing=config.training.label_smoothing)
  lpa_pass = config.training.mode == 'lpa'  # its LPA step is the heaviest
  lowered = step.lower(state, {'image': images, 'label': labels, 'mask': mask},
                       lpa_pass=lpa_pass)
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      'mesh': dict(mesh.shape), 'devices': mesh.size, 'stage': stage, 'batch': batch,
      'platform': mesh.devices.flat[0].platform, 'device_kind': mesh.devices.flat[0].device_kind,
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'peak_bytes': peak,
      'flops': float(cost.get('flops', float('nan'))) if cost else float('nan'),
      'program': lowered.as_text(debug_info=True),
  }


MAX_BATCH_PER_DEVICE = 2**16  # a search bound (tiny models fit millions): "at least this"


def largest_batch(config, capacity: int, channels: int = 3, devices=None, log=print):
  """(largest global batch whose step fits in `capacity` bytes per device, its figures);
  (0, figures at the smallest batch) if none fits.

  Memory is roughly affine in the batch, so two compiles give a first guess; bisection
  between a batch that fits and one that does not (TPU layouts pad in steps, so the line is
  only a guess) ends with a batch that fits whose next multiple of the data axis does not.
  Searched up to MAX_BATCH_PER_DEVICE examples per device on the data axis.
  """
  from paraformer_jax import sharding
  unit = sharding.make_mesh(config.mesh.data, config.mesh.branch, devices).shape['data']
  bound = MAX_BATCH_PER_DEVICE * unit
  results = {}

  def fits(batch):
    if batch not in results:
      results[batch] = compile_train_step(config, channels, devices, batch)
      log(f'  batch {batch}: peak {results[batch]["peak_bytes"] / 2**30:.3f} GiB per device')
    return results[batch]['peak_bytes'] <= capacity

  def to_unit(b):
    return min(max(int(b) // unit * unit, unit), bound)

  fits(unit), fits(4 * unit)
  slope = max((results[4 * unit]['peak_bytes'] - results[unit]['peak_bytes']) / (3 * unit), 1)
  guess = to_unit(unit + (capacity - results[unit]['peak_bytes']) / slope)
  lo, hi = (guess, None) if fits(guess) else (None, guess)
  while hi is None and lo < bound:  # grow until a batch does not fit
    lo, hi = (to_unit(2 * lo), None) if fits(to_unit(2 * lo)) else (lo, to_unit(2 * lo))
  while lo is None:  # shrink until one fits
    if hi == unit:
      return 0, results[unit]
    lo, hi = (to_unit(hi // 2), hi) if fits(to_unit(hi // 2)) else (None, to_unit(hi // 2))
  while hi is not None and hi - lo > unit:
    mid = to_unit((lo + hi) // 2)
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, results[lo]


def main(argv):
  del argv
  from paraformer_jax import cli  # imports JAX: only once XLA_FLAGS is set (below)
  cli.setup_logging()
  config = cli.config()
  devices = tpu_devices(FLAGS.topology) if FLAGS.topology else None
  result = compile_train_step(config, FLAGS.channels, devices)
  gib = lambda b: f'{b / 2**30:.3f} GiB'
  print(f'compiled one {config.training.mode} train step (stage {result["stage"]}, '
        f'global batch {result["batch"]}) for {result["devices"]} x {result["device_kind"]} on '
        f'mesh {result["mesh"]}')
  print(f'per device: arguments {gib(result["argument_bytes"])}, outputs '
        f'{gib(result["output_bytes"])} ({gib(result["alias_bytes"])} of them reusing donated '
        f'arguments), temporaries {gib(result["temp_bytes"])}; peak {gib(result["peak_bytes"])}')
  if not FLAGS.topology:
    print(f'FLOPs per step (per device, XLA estimate): {result["flops"]:.3e}')
    return
  capacity = chip_hbm_bytes(devices, FLAGS.topology)
  if capacity is None:
    print(f'HBM of {result["device_kind"]} unknown: no verdict.')
    return
  fits = result['peak_bytes'] <= capacity
  print(f'HBM per device {gib(capacity)}: {"FITS" if fits else "DOES NOT FIT"} '
        f'({100 * result["peak_bytes"] / capacity:.0f}% used)')
  if FLAGS.max_batch:
    print('searching the largest global batch that fits (one compile per line):')
    batch, best = largest_batch(config, capacity, FLAGS.channels, devices)
    bound = MAX_BATCH_PER_DEVICE * best['mesh']['data']
    print(f'largest global batch that fits: {"at least " if batch == bound else ""}{batch} '
          f'(peak {gib(best["peak_bytes"])} per device)' if batch else
          'no batch fits: even one example per device on the data axis is too much.')


if __name__ == '__main__':
  define_flags()
  # Fake devices must be requested before JAX starts, hence this look at argv before absl.
  for arg in sys.argv[1:]:
    if arg.startswith('--devices=') and int(arg.split('=', 1)[1]) > 0:
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                                 f'device_count={arg.split("=", 1)[1]}')
      os.environ['JAX_PLATFORMS'] = 'cpu'
    if arg.startswith('--topology'):
      os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the TPU, run nothing on it
  from paraformer_jax import cli  # noqa: E402 (JAX starts after the environment is set)
  cli.run(main)
