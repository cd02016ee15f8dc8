"""Two processes on 127.0.0.1 (CPU collectives) train and infer like one process."""
import argparse
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from paraformer_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(workdir, data_dir, mesh, processes, devices_per_process):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  cmd = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.training.epochs=1', f'--config.mesh.data={mesh[0]}',
         f'--config.mesh.branch={mesh[1]}']
  if processes > 1:
    port = _free_port()
    cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}']
  procs = [subprocess.Popen(cmd + ([f'--process_id={i}'] if processes > 1 else []), cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _final_params(data_dir, workdir):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  trainer = train.Trainer(config, workdir)  # this process: 8 devices, another mesh
  return trainer.restore(trainer.ckpts.latest_step())[0].params


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def single_process(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('single'))
  _run(workdir, data_dir, (4, 1), processes=1, devices_per_process=4)
  return _final_params(data_dir, workdir)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', [(1, 4), (4, 1)], ids=['branch-spans-processes',
                                                       'data-spans-processes'])
def test_two_processes_equal_one(data_dir, single_process, tmp_path, mesh):
  outs = _run(str(tmp_path), data_dir, mesh, processes=2, devices_per_process=2)
  assert 'process 1 of 2, 2 local / 4 global devices' in outs[1]
  # Only process 0 prints the final table.
  assert ['final (step 13)' in out for out in outs] == [True, False]
  got = _final_params(data_dir, str(tmp_path))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(single_process)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('kind,branches,depth', [('paraformer', 8, 2), ('pipeline', 1, 4)])
def test_forward_over_two_processes_equals_one_process(kind, branches, depth):
  """benchmarks/branch_parallel.py: branches (or pipeline stages) on 2 processes, one core
  each; every process compares the logits with the same model computed on its own."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import branch_parallel
  args = argparse.Namespace(repeats=1, batches='1,8', image_size=8, width=64, micro_batch=4)
  result = branch_parallel._spawn(kind, branches, depth, 2, args)
  assert set(result) == {'1', '8', 'max_abs_diff'}
  assert result['max_abs_diff'] < 1e-4
