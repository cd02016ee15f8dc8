"""Continual learning on digits, part 1: a ParaFormer 8x1 on the classes 0-4 only.

  python -m paraformer_jax.main --config=configs/digits_0to4.py --workdir=/tmp/pf_digits_0to4
then part 2 (configs/digits_5to9.py) adds branches for the classes 5-9.
"""
from configs import digits


def get_config():
  config = digits.get_config()
  config.data.classes = '0-4'
  config.data.num_classes = 5
  config.eval_every_steps = 45  # every 5 epochs of 9 steps
  config.log_every_steps = 45
  return config
