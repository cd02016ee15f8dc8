"""Two processes on 127.0.0.1 (CPU collectives) train and infer like one process."""
import argparse
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import preempt_at

from configs import tiny
from paraformer_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX's preemption notifier looks for SIGTERM once a second (TSL's SigtermNotifier), and a
# tiny run's 13 steps can take less: the tests signal while the step compiles (seconds), so
# that the processes agree on a step before the run ends.
COMPILING = 'compiling the training step'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, mesh, processes, devices_per_process, flags=(), logs=None):
  """Popen of every process of a tiny run; process i > 0 writes its output to logs[i]."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  cmd = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.training.epochs=1', f'--config.mesh.data={mesh[0]}',
         f'--config.mesh.branch={mesh[1]}', *flags]
  if processes > 1:
    port = _free_port()
    cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}']
  out = lambda i: subprocess.PIPE if logs is None or i == 0 else logs[i]
  return [subprocess.Popen(cmd + ([f'--process_id={i}'] if processes > 1 else []), cwd=REPO,
                           env=env, stdout=out(i), stderr=subprocess.STDOUT, text=True)
          for i in range(processes)]


def _run(workdir, data_dir, mesh, processes, devices_per_process, flags=()):
  procs = _start(workdir, data_dir, mesh, processes, devices_per_process, flags)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _final_params(data_dir, workdir, **overrides):
  """The last parameters of a run, restored in this process (8 devices, another mesh)."""
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(overrides)
  trainer = train.Trainer(config, workdir, create=False)
  return trainer.restore(trainer.ckpts.latest_step())[0].params


def _assert_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


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
  _assert_close(_final_params(data_dir, str(tmp_path)), single_process)


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


# Branch surgery with the branch axis spanning two processes (one device each): stagewise
# extension across a stage boundary (preempted in stage 2 and resumed), fine-tuning from
# that run and expanding it end where one process ends.
# On the digits 0-4 (621 training images, 15 steps of 40 per stage), so that expand_from can
# add 5-9 (expansion adds classes).
STAGEWISE = {'training.mode': 'stagewise', 'training.branches_per_stage': 2,
             'data.classes': '0-4', 'data.num_classes': 5, 'training.batch_size': 40}


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(data_dir, single_process,
                                                                     tmp_path):
  """Only process 1 is signalled (a preempted host): JAX's coordination service tells
  process 0, both save the same step and exit 143, and the same command resumes to the
  parameters of the uninterrupted run."""
  workdir = str(tmp_path / 'one_signalled')
  flags = ['--config.log_every_steps=1']
  with open(os.path.join(workdir + '_process1.log'), 'w') as log1:
    procs = _start(workdir, data_dir, (1, 4), 2, 2, flags, logs=[None, log1])
    lines = preempt_at(procs, COMPILING, to=[1])
  with open(workdir + '_process1.log') as f:
    other = f.read()
  saved = [re.search(r'Preempted: saved step (\d+)', text) for text in (''.join(lines), other)]
  assert all(saved), ''.join(lines[-30:]) + other[-3000:]
  assert saved[0].group(1) == saved[1].group(1)
  outs = _run(workdir, data_dir, (1, 4), processes=2, devices_per_process=2, flags=flags)
  assert f'Resuming from step {saved[0].group(1)}' in outs[0]
  _assert_close(_final_params(data_dir, workdir), single_process)


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='module')
def stagewise_runs(data_dir, tmp_path_factory):
  """(one-process workdir, two-process workdir, preempted and resumed) of a stagewise run."""
  one, two = (str(tmp_path_factory.mktemp(n)) for n in ('stagewise1', 'stagewise2'))
  flags = _flags(STAGEWISE) + ['--config.log_every_steps=2']
  _run(one, data_dir, (1, 2), processes=1, devices_per_process=2, flags=flags)
  with open(os.path.join(two, 'process1.log'), 'w') as log1:
    procs = _start(two, data_dir, (1, 2), 2, 1, flags, logs=[None, log1])
    lines = preempt_at(procs, f'stage 2/2 {COMPILING}')
  assert any('Preempted: saved step' in line for line in lines), ''.join(lines[-30:])
  outs = _run(two, data_dir, (1, 2), processes=2, devices_per_process=1, flags=flags)
  assert 'Resuming from step' in outs[0] and '(stage 1)' in outs[0]
  return one, two


@pytest.mark.slow
def test_stagewise_across_processes_equals_one_process(data_dir, stagewise_runs):
  one, two = stagewise_runs
  want, got = (_final_params(data_dir, w, **STAGEWISE) for w in (one, two))
  assert set(got) == {'embed', 'frozen_branches', 'branches', 'head'}
  _assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize('source', ['init_from', 'expand_from'])
def test_init_and_expand_across_processes_equal_one_process(data_dir, stagewise_runs,
                                                            tmp_path, source):
  overrides = {source: stagewise_runs[0], 'training.mode': 'joint'}
  if source == 'expand_from':
    overrides['model.num_branches'] = 2  # two new branches beside the four of the source
    overrides['data.classes'] = '5-9'  # and five new classes
  results = []
  for processes in (1, 2):
    workdir = str(tmp_path / f'p{processes}')
    outs = _run(workdir, data_dir, (1, 2), processes, 2 // processes, _flags(overrides))
    assert f'Parameters from {stagewise_runs[0]}' in outs[0]
    results.append(_final_params(data_dir, workdir, **overrides))
  _assert_close(results[1], results[0])
