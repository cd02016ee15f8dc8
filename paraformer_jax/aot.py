"""Ahead-of-time check: compile one train step for a config and mesh, with no data, no training.

  python -m paraformer_jax.aot --config=configs/imagenet.py --devices=64
  python -m paraformer_jax.aot --config=configs/cifar10.py --config.mesh.branch=4 --devices=8

Prints the per-device memory of the compiled step (arguments, outputs, temporaries) and its
FLOPs, so that a sharding error or an obvious out-of-memory shows up before paying for a pod.
`--devices=N` builds the mesh from N fake CPU devices: shapes, shardings and the errors they
raise are those of the real run; memory and FLOPs are XLA:CPU's estimates, a guide for
GPU/TPU rather than a promise. Without it, the machine's own devices are used.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a program: importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_integer('devices', 0, 'Compile for this many fake CPU devices (0: real devices).')
  flags.DEFINE_integer('channels', 3, 'Image channels.')
  flags.mark_flags_as_required(['config'])


def compile_train_step(config, channels: int = 3):
  """Lowers and compiles the heaviest train step of `config` on its mesh; returns figures."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from paraformer_jax import optim, sharding, steps, train

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.branch)
  train.check_config(config, mesh)
  plan = train.StagePlan(config, steps_per_epoch=1000)
  stage = plan.num_stages - 1  # stagewise: the last stage holds the most branches
  tx = optim.make_tx(config.training, plan.steps_per_epoch)
  size, batch = config.data.image_size, config.training.batch_size
  state = train.abstract_state(plan, tx, mesh, stage, (size, size, channels))
  data = NamedSharding(mesh, P('data'))
  images = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32, sharding=data)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
  model = plan.model(stage)
  step = steps.make_train_step(model, mesh, tx, config.training.mode, plan.frozen_keys(stage),
                               config.training.clip_norm)
  lpa_pass = config.training.mode == 'lpa'  # its LPA step is the heaviest
  compiled = step.lower(state, {'image': images, 'label': labels}, lpa_pass=lpa_pass).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      'mesh': dict(mesh.shape), 'devices': mesh.size, 'stage': stage,
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'flops': float(cost.get('flops', float('nan'))) if cost else float('nan'),
  }


def main(argv):
  del argv
  result = compile_train_step(FLAGS.config, FLAGS.channels)
  gib = lambda b: f'{b / 2**30:.3f} GiB'
  print(f'compiled one {FLAGS.config.training.mode} train step (stage {result["stage"]}) on '
        f'mesh {result["mesh"]} ({result["devices"]} devices)')
  print(f'per device: arguments {gib(result["argument_bytes"])}, outputs '
        f'{gib(result["output_bytes"])}, temporaries {gib(result["temp_bytes"])}')
  print(f'FLOPs per step (per device, XLA estimate): {result["flops"]:.3e}')


if __name__ == '__main__':
  define_flags()
  # Fake devices must be requested before JAX starts, hence this look at argv before absl.
  for arg in sys.argv[1:]:
    if arg.startswith('--devices=') and int(arg.split('=', 1)[1]) > 0:
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                                 f'device_count={arg.split("=", 1)[1]}')
      os.environ['JAX_PLATFORMS'] = 'cpu'
  app.run(main)
