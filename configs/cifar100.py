"""CIFAR-100 as in the paper (224 px, patch 16), or `:32px` for small machines.

  tfds build cifar100 --file_format=array_record
  python -m paraformer_jax.main --config=configs/cifar100.py --workdir=/tmp/pf_cifar100
"""
from configs import cifar10


def get_config(variant='224px'):
  config = cifar10.get_config(variant)
  config.data.name = 'cifar100'
  config.data.num_classes = 100
  return config
