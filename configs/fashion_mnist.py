"""Fashion-MNIST as in the paper (28 px resized to 224, patch 16), or `:32px`.

  tfds build fashion_mnist --file_format=array_record
  python -m paraformer_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/pf_fmnist
"""
from configs import cifar10


def get_config(variant='224px'):
  config = cifar10.get_config(variant)
  config.data.name = 'fashion_mnist'
  return config
