"""CIFAR-10 as in the paper (224 px, patch 16), or `:32px` (32 px, patch 4) for small machines.

  tfds build cifar10 --file_format=array_record      # once; needs internet
  python -m paraformer_jax.main --config=configs/cifar10.py --workdir=/tmp/pf_cifar10
  python -m paraformer_jax.main --config=configs/cifar10.py:32px --workdir=/tmp/pf_c10_32
"""
from configs import default


def get_config(variant='224px'):
  config = default.get_config()
  if variant == '32px':
    config.data.image_size = 32
    config.model.patch_size = 4
  elif variant != '224px':
    raise ValueError(f"variant {variant!r}: use '224px' or '32px'.")
  return config
