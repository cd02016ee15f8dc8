"""Entry point: train (default) or evaluate a ParaFormer from an ml_collections config.

  python -m paraformer_jax.main --config=configs/digits.py --workdir=/tmp/pf_digits
  python -m paraformer_jax.main --config=configs/digits.py --workdir=/tmp/pf_digits \
      --mode=eval [--step=N]
Any config field can be overridden, e.g. --config.training.mode=stagewise.
"""
from absl import flags
from ml_collections import config_flags

from paraformer_jax import cli, processes, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (resuming from workdir) then test; eval: test a checkpoint.')
flags.DEFINE_integer('step', None, 'eval: the checkpoint step to load (default: latest).')
processes.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  cli.no_positional_arguments(argv)
  cli.setup_logging()
  config = cli.config()
  processes.start()
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)


if __name__ == '__main__':
  cli.run(main)
