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

A program that needs more than the chip has gets a DOES NOT FIT verdict with the bytes
needed and available (libtpu refuses to compile it), not a traceback, and exit status 1.

For a TPU target it also prints a roofline: the FLOPs the program executes and the bytes it
moves per device (XLA's cost analysis), each against the chip's peak (`chips.CHIPS`), and
the lower bound on step time they imply. It is an estimate, never a measured time; XLA
counts a loop's body once, so a program with loops is said to be undercounted.
"""
import importlib.util
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from paraformer_jax.chips import Chip, lookup

FLAGS = flags.FLAGS
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


def devices_per_chip(devices, topology: str) -> int:
  chips = 1
  for n in topology.split(':')[-1].split('x'):
    chips *= int(n)
  return len(devices) // chips


def chip_hbm_bytes(devices, topology: str) -> int | None:
  """HBM of one device: the chip's, shared by the devices (cores) on it."""
  chip = lookup(devices[0].device_kind)
  if chip is None:
    return None
  return int(chip.hbm_gib * 2**30) // devices_per_chip(devices, topology)


# libtpu's refusal of a program bigger than the chip, e.g. "RESOURCE_EXHAUSTED: Ran out of
# memory in memory space hbm. ... the total memory required for HLO temporaries (27.95G)
# exceeds available HBM (15.75G)". Sizes as XLA writes them: binary units.
_OUT_OF_MEMORY = re.compile(
    r'\(([\d.]+)([KMGT]?)\) exceeds (?:the )?available [^(]*\(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def out_of_memory(error: Exception) -> dict | None:
  """{'needed_bytes', 'available_bytes' (None where the message gives none), 'message'} if
  `error` is the compiler's RESOURCE_EXHAUSTED, else None."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  line = next((l for l in text.splitlines() if 'RESOURCE_EXHAUSTED' in l), text).strip()
  match = _OUT_OF_MEMORY.search(text)
  size = lambda value, unit: int(float(value) * _UNITS[unit])
  return {'needed_bytes': size(*match.group(1, 2)) if match else None,
          'available_bytes': size(*match.group(3, 4)) if match else None,
          'message': line[:300]}


def compile_train_step(config, channels: int = 3, devices=None, batch: int | None = None):
  """Lowers and compiles the heaviest train step of `config` on its mesh over `devices`
  (default: this machine's); returns the lowered program's text and the figures."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from paraformer_jax import optim, run_checks, run_state, sharding, steps

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.branch, devices)
  batch = batch or config.training.batch_size
  run_checks.check_config(config, mesh)
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
                               label_smoothing=config.training.label_smoothing,
                               grad_clip_norm=config.training.grad_clip_norm)
  lpa_pass = config.training.mode == 'lpa'  # its LPA step is the heaviest
  lowered = step.lower(state, {'image': images, 'label': labels, 'mask': mask},
                       lpa_pass=lpa_pass)
  figures = {'mesh': dict(mesh.shape), 'devices': mesh.size, 'stage': stage, 'batch': batch,
             'platform': mesh.devices.flat[0].platform,
             'device_kind': mesh.devices.flat[0].device_kind}
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(e)
    if oom is None:
      raise
    return {**figures, 'out_of_memory': oom, 'peak_bytes': oom['needed_bytes']}
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  hlo = compiled.as_text() or ''
  return {
      **figures, 'out_of_memory': None,
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'peak_bytes': peak,
      'flops': float(cost.get('flops', float('nan'))) if cost else float('nan'),
      'bytes_accessed': float(cost.get('bytes accessed', float('nan'))) if cost else float('nan'),
      # Loops in the compiled program: XLA's cost analysis counts each body once.
      'loops': len(re.findall(r'\bwhile\(', hlo)),
      'program': lowered.as_text(debug_info=True),
  }


def fits(result, capacity: int) -> bool:
  """Whether a compiled step (or one the compiler refused) fits `capacity` bytes per device."""
  if result['out_of_memory'] is not None:
    return False
  return result['peak_bytes'] <= capacity


def roofline(result, chip: Chip, per_chip: int) -> dict | None:
  """Lower bounds on the step time from the program's FLOPs and bytes per device against
  the device's share of the chip's peak rates; None where the chip's rates are unknown."""
  if chip.bf16_tflops is None or chip.hbm_gbps is None:
    return None
  compute = result['flops'] / (chip.bf16_tflops * 1e12 / per_chip)
  memory = result['bytes_accessed'] / (chip.hbm_gbps * 1e9 / per_chip)
  return {'compute_s': compute, 'memory_s': memory, 'bound_s': max(compute, memory),
          'bound_by': 'compute (FLOP/s)' if compute >= memory else 'memory (HBM bandwidth)',
          'intensity': result['flops'] / result['bytes_accessed'],
          'ridge': chip.bf16_tflops * 1e12 / (chip.hbm_gbps * 1e9)}


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

  def fits_at(batch):
    if batch not in results:
      results[batch] = compile_train_step(config, channels, devices, batch)
      log(f'  batch {batch}: {memory_line(results[batch])}')
    return fits(results[batch], capacity)

  def to_unit(b):
    return min(max(int(b) // unit * unit, unit), bound)

  fits_at(unit), fits_at(4 * unit)
  # A refused compile may not say how much it needed: then it counts as twice the capacity.
  peak = lambda b: results[b]['peak_bytes'] or 2 * capacity
  slope = max((peak(4 * unit) - peak(unit)) / (3 * unit), 1)
  guess = to_unit(unit + (capacity - peak(unit)) / slope)
  lo, hi = (guess, None) if fits_at(guess) else (None, guess)
  while hi is None and lo < bound:  # grow until a batch does not fit
    lo, hi = (to_unit(2 * lo), None) if fits_at(to_unit(2 * lo)) else (lo, to_unit(2 * lo))
  while lo is None:  # shrink until one fits
    if hi == unit:
      return 0, results[unit]
    lo, hi = (to_unit(hi // 2), hi) if fits_at(to_unit(hi // 2)) else (None, to_unit(hi // 2))
  while hi is not None and hi - lo > unit:
    mid = to_unit((lo + hi) // 2)
    lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
  return lo, results[lo]


def gib(n) -> str:
  return 'unknown' if n is None else f'{n / 2**30:.3f} GiB'


def memory_line(result) -> str:
  """Per-device memory of a compiled step, or what the compiler said it needed."""
  oom = result['out_of_memory']
  if oom is not None:
    return (f'refused by the compiler: needs {gib(oom["needed_bytes"])} of temporaries, '
            f'{gib(oom["available_bytes"])} available')
  return (f'arguments {gib(result["argument_bytes"])}, outputs {gib(result["output_bytes"])} '
          f'({gib(result["alias_bytes"])} of them reusing donated arguments), temporaries '
          f'{gib(result["temp_bytes"])}; peak {gib(result["peak_bytes"])}')


def roofline_lines(result, chip: Chip, per_chip: int) -> list[str]:
  bound = roofline(result, chip, per_chip)
  if bound is None:
    return [f'roofline: peak rates of {result["device_kind"]} unknown.']
  lines = [
      f'roofline per device (an estimate, not a measured time): '
      f'{result["flops"]:.3e} FLOPs at {chip.bf16_tflops / per_chip:g} TFLOP/s bf16 peak = '
      f'{1e3 * bound["compute_s"]:.2f} ms; {result["bytes_accessed"]:.3e} bytes at '
      f'{chip.hbm_gbps / per_chip:g} GB/s = {1e3 * bound["memory_s"]:.2f} ms',
      f'  step time >= {1e3 * bound["bound_s"]:.2f} ms, bound by {bound["bound_by"]}: '
      f'{bound["intensity"]:.0f} FLOPs per byte against the chip\'s ridge of '
      f'{bound["ridge"]:.0f}']
  if result['loops']:
    lines.append(f'  the program has {result["loops"]} loop(s), whose bodies XLA counts once: '
                 f'FLOPs, bytes and the bound are undercounts')
  return lines


def does_not_fit_hint(config) -> str:
  return (f'try a smaller --config.training.batch_size (now {config.training.batch_size}; '
          f'--max_batch finds the largest that fits), a larger slice, or more devices on the '
          f'branch axis (--config.mesh.branch, now {config.mesh.branch}).')


def main(argv):
  from paraformer_jax import cli  # imports JAX: only once XLA_FLAGS is set (below)
  cli.no_positional_arguments(argv)
  cli.setup_logging()
  config = cli.config()
  devices = tpu_devices(FLAGS.topology) if FLAGS.topology else None
  result = compile_train_step(config, FLAGS.channels, devices)
  print(f'compiled one {config.training.mode} train step (stage {result["stage"]}, '
        f'global batch {result["batch"]}) for {result["devices"]} x {result["device_kind"]} on '
        f'mesh {result["mesh"]}')
  print(f'per device: {memory_line(result)}')
  if not FLAGS.topology:
    print(f'FLOPs per step (per device, XLA estimate): {result["flops"]:.3e}')
    return
  capacity = chip_hbm_bytes(devices, FLAGS.topology)
  if capacity is None:
    print(f'HBM of {result["device_kind"]} unknown: no verdict.')
    return
  if fits(result, capacity):
    print(f'HBM per device {gib(capacity)}: FITS '
          f'({100 * result["peak_bytes"] / capacity:.0f}% used)')
    chip = lookup(result['device_kind'])
    for line in roofline_lines(result, chip, devices_per_chip(devices, FLAGS.topology)):
      print(line)
  else:
    print(f'HBM per device {gib(capacity)}: DOES NOT FIT: {does_not_fit_hint(config)}')
  verdict = 0 if fits(result, capacity) else 1  # the exit status: scripts can test it
  if FLAGS.max_batch:
    print('searching the largest global batch that fits (one compile per line):')
    batch, best = largest_batch(config, capacity, FLAGS.channels, devices)
    bound = MAX_BATCH_PER_DEVICE * best['mesh']['data']
    print(f'largest global batch that fits: {"at least " if batch == bound else ""}{batch} '
          f'(peak {gib(best["peak_bytes"])} per device)' if batch else
          f'no batch fits: DOES NOT FIT even at {best["batch"]} (one example per device on the '
          f'data axis): {memory_line(best)}')
  return verdict


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
