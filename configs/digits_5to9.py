"""Continual learning on digits, part 2: 4 new branches for the classes 5-9, beside the frozen
8 branches of part 1 (configs/digits_0to4.py), whose head rows for 0-4 are kept as they were.

  python -m paraformer_jax.main --config=configs/digits_5to9.py --workdir=/tmp/pf_digits_5to9 \
      --config.expand_from=/tmp/pf_digits_0to4
At the end it prints (and writes to forgetting.json) test accuracy on the digits 0-4 and 5-9
before and after the expansion.
"""
from configs import digits


def get_config():
  config = digits.get_config()
  config.expand_from = '/tmp/pf_digits_0to4'  # the workdir of part 1
  config.data.classes = '5-9'
  config.data.num_classes = 10  # the head grows from 5 to 10 rows
  config.model.num_branches = 4  # new branches, trained; part 1's 8 are frozen
  config.eval_every_steps = 45  # every 5 epochs of 9 steps
  config.log_every_steps = 45
  return config
