"""The ahead-of-time compile check."""
import os
import subprocess
import sys

import pytest

from configs import tiny
from paraformer_jax import aot, flops, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compiles_a_sharded_train_step_and_counts_its_flops():
  config = tiny.get_config()
  config.training.mode = 'joint'
  config.mesh.data, config.mesh.branch = 4, 2
  result = aot.compile_train_step(config, channels=1)
  assert result['mesh'] == {'data': 4, 'branch': 2} and result['devices'] == 8
  # The arguments per device are at least the state's share: the branch stack is split
  # over 2 devices, each device holds the rest whole.
  assert result['argument_bytes'] > 0 and result['temp_bytes'] > 0
  # XLA's FLOPs per device against the analytic count of the work done: a training step is
  # ~3x forward, over batch / 4 rows and half the branches (plus softmax, norms, Adam: a
  # bounded surplus).
  half = train.build_model(config).clone(num_branches=2)
  per_device = 3 * flops.forward_flops(half, config.data.image_size, 1, executed=True) * (
      config.training.batch_size / 4)
  assert 0.9 * per_device < result['flops'] < 1.4 * per_device


def test_an_indivisible_mesh_fails_before_compiling():
  env = dict(os.environ, XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-m', 'paraformer_jax.aot', '--config=configs/tiny.py',
                        '--devices=6', '--config.mesh.branch=3'], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert out.returncode != 0
  assert 'num_branches=4 is not divisible by the mesh branch axis size 3' in out.stderr
