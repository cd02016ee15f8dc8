"""A tiny digits run for tests: 4 branches of 1 small block, a few steps.

  python -m paraformer_jax.main --config=configs/tiny.py --workdir=/tmp/pf_tiny
"""
from configs import digits


def get_config():
  config = digits.get_config()
  config.model.width = 32
  config.model.mlp_dim = 64
  config.model.num_branches = 4
  config.data.crop_padding = 1  # random augmentation on: resume tests must reproduce it
  config.training.epochs = 2
  config.training.batch_size = 96  # 13 steps per epoch
  config.eval_batch_size = 128  # the 180 validation / 360 test images end in a partial batch
  config.log_every_steps = 5
  return config
