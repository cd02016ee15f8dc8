"""Entry point: train (default) or evaluate a ParaFormer from an ml_collections config.

  python -m paraformer_jax.main --config=configs/digits.py --workdir=/tmp/pf_digits
  python -m paraformer_jax.main --config=configs/digits.py --workdir=/tmp/pf_digits \
      --mode=eval [--step=N]
Any config field can be overridden, e.g. --config.training.mode=stagewise.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from paraformer_jax import cli, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (resuming from workdir) then test; eval: test a checkpoint.')
flags.DEFINE_integer('step', None, 'eval: the checkpoint step to load (default: latest).')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize(): one process per host. On TPU pods and '
                  'SLURM the coordinator is found automatically; elsewhere pass the next three.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (implies --distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup_logging()
  config = cli.config()
  if FLAGS.distributed or FLAGS.coordinator_address:
    import jax
    # CPU collectives across processes (tests, CPU clusters); GPU and TPU ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)


if __name__ == '__main__':
  cli.run(main)
