"""Test setup: 8 virtual CPU devices (set before JAX starts) and small shared models."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from paraformer_jax import model as model_lib  # noqa: E402

# One small shape for most tests: 8x8x3 images, patch 4 -> 4 patches + cls = 5 tokens.
IMAGE_SHAPE = (8, 8, 3)
SMALL = dict(num_classes=10, patch_size=4, width=64, num_heads=1, mlp_dim=128)


@pytest.fixture(scope='session')
def small_model():
  return model_lib.ParaFormer(num_branches=8, branch_depth=2, **SMALL)


@pytest.fixture(scope='session')
def small_params(small_model):
  dummy = jax.numpy.zeros((1, *IMAGE_SHAPE))
  return small_model.init(jax.random.key(0), dummy)['params']


@pytest.fixture(scope='session')
def images():
  return jax.random.normal(jax.random.key(42), (8, *IMAGE_SHAPE))
