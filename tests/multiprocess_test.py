"""Two processes on 127.0.0.1 (CPU collectives) train, resume on another slice, evaluate
and compress like one process; data read from a bucket (the `gcs` fixture)."""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import copy_to_bucket, preempt_at

from configs import tiny
from paraformer_jax import input_pipeline, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX's preemption notifier looks for SIGTERM once a second (TSL's SigtermNotifier), and a
# tiny run's 13 steps can take less: the tests signal while the step compiles (seconds), so
# that the processes agree on a step before the run ends.
COMPILING = 'compiling the training step'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, mesh, processes, devices_per_process, flags=(), logs=None,
           program=('paraformer_jax.main', '--config.training.epochs=1')):
  """Popen of every process of a tiny run; process i > 0 writes its output to logs[i]."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  cmd = [sys.executable, '-m', program[0], '--config=configs/tiny.py', f'--workdir={workdir}',
         f'--config.data.data_dir={data_dir}', *program[1:], f'--config.mesh.data={mesh[0]}',
         f'--config.mesh.branch={mesh[1]}', *flags]
  if processes > 1:
    port = _free_port()
    cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}']
  out = lambda i: subprocess.PIPE if logs is None or i == 0 else logs[i]
  return [subprocess.Popen(cmd + ([f'--process_id={i}'] if processes > 1 else []), cwd=REPO,
                           env=env, stdout=out(i), stderr=subprocess.STDOUT, text=True)
          for i in range(processes)]


def _run(workdir, data_dir, mesh, processes, devices_per_process, flags=(), **kw):
  procs = _start(workdir, data_dir, mesh, processes, devices_per_process, flags, **kw)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _final_state(data_dir, workdir, **overrides):
  """The last (parameters, optimizer state) of a run, restored in this process (8 devices,
  another mesh)."""
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(overrides)
  trainer = train.Trainer(config, workdir, create=False)
  state = trainer.restore(trainer.ckpts.latest_step())[0]
  return {'params': state.params, 'opt_state': state.opt_state}


def _final_params(data_dir, workdir, **overrides):
  return _final_state(data_dir, workdir, **overrides)['params']


def _assert_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.get_source('sklearn_digits', 'train', path)  # prepared once, here
  return path


@pytest.fixture(scope='module')
def bucket_data(gcs, data_dir):
  del gcs
  return copy_to_bucket(data_dir, 'sklearn_digits')


@pytest.fixture(scope='module')
def single_process(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('single'))
  _run(workdir, data_dir, (4, 1), processes=1, devices_per_process=4)
  return _final_state(data_dir, workdir)


@pytest.fixture(scope='module')
def two_processes(bucket_data, tmp_path_factory):
  """(workdir, outputs) of a 2-process run, batch axis across them, its data read from the
  bucket by one worker process on each."""
  workdir = str(tmp_path_factory.mktemp('two'))
  outs = _run(workdir, bucket_data, (4, 1), processes=2, devices_per_process=2,
              flags=['--config.workers=1'])
  return workdir, outs


@pytest.mark.slow
def test_two_processes_reading_the_bucket_equal_one_reading_a_local_copy(
    data_dir, single_process, two_processes):
  workdir, outs = two_processes
  assert 'process 1 of 2, 2 local / 4 global devices' in outs[1]
  # Only process 0 prints the final table.
  assert ['final (step 13)' in out for out in outs] == [True, False]
  _assert_close(_final_state(data_dir, workdir), single_process)


@pytest.mark.slow
def test_a_pod_checkpoint_evaluates_on_one_device(data_dir, two_processes):
  """--mode=eval of the 2-process run on a workstation (1 process, 1 device): its own
  test figures."""
  workdir, _ = two_processes
  _run(workdir, data_dir, (1, 1), processes=1, devices_per_process=1,
       program=('paraformer_jax.main', '--mode=eval'))
  final, evaluated = (json.load(open(os.path.join(workdir, f'{name}_prefix_accuracy.json')))
                      for name in ('final', 'eval_step13'))
  assert evaluated['count'] == final['count'] == 360
  np.testing.assert_allclose([r['accuracy'] for r in evaluated['prefixes']],
                             [r['accuracy'] for r in final['prefixes']], atol=1 / 360 + 1e-9)
  np.testing.assert_allclose(evaluated['loss'], final['loss'], rtol=1e-4)


@pytest.mark.slow
def test_compress_on_two_processes_writes_what_one_process_writes(data_dir, two_processes,
                                                                  tmp_path):
  workdir, _ = two_processes
  reports = []
  for processes in (1, 2):
    out = str(tmp_path / f'k2_p{processes}')
    outs = _run(workdir, data_dir, (1, 2), processes, 2 // processes,
                program=('paraformer_jax.compress', f'--out={out}', '--k=2'))
    assert 'kept 2 branches [0, 1]' in outs[0] and 'kept' not in ''.join(outs[1:])
    reports.append(json.load(open(os.path.join(out, 'compression.json'))))
    assert {'checkpoints', 'compression.json', 'config.json', 'config.py'} <= set(
        os.listdir(out))
  one, two = reports
  assert [r['branches'] for r in two['rows']] == [1, 2, 3, 4] and two['k'] == 2
  for a, b in zip(one['rows'], two['rows']):
    np.testing.assert_allclose(b['test_accuracy'], a['test_accuracy'], atol=1 / 360 + 1e-9)
  _assert_close(*(_final_params(data_dir, str(tmp_path / f'k2_p{p}'),
                                **{'model.num_branches': 2}) for p in (2, 1)))


@pytest.mark.slow
def test_forward_over_two_processes_equals_one_process():
  """benchmarks/branch_parallel.py: branches on 2 processes, one core each; every process
  compares the logits with the same model computed on its own. (Its pipeline baseline,
  `kind='pipeline'`, runs the same harness; not run here for the suite's time.)"""
  kind, branches, depth = 'paraformer', 8, 2
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import branch_parallel
  args = argparse.Namespace(repeats=1, batches='8', image_size=8, width=64, micro_batch=4)
  result = branch_parallel._spawn(kind, branches, depth, 2, args)
  assert set(result) == {'8', 'max_abs_diff'}
  assert result['max_abs_diff'] < 1e-4


# Branch surgery with the branch axis spanning two processes (one device each): stagewise
# extension across a stage boundary (preempted in stage 2 and resumed), fine-tuning from
# that run and expanding it end where one process ends.
# On the digits 0-4 (621 training images, 15 steps of 40 per stage), so that expand_from can
# add 5-9 (expansion adds classes).
STAGEWISE = {'training.mode': 'stagewise', 'training.branches_per_stage': 2,
             'data.classes': '0-4', 'data.num_classes': 5, 'training.batch_size': 40}


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_then_resume_on_other_slices(data_dir, single_process,
                                                                    tmp_path):
  """Only process 1 is signalled (a preempted host): JAX's coordination service tells
  process 0, both save the same step and exit 143. The branch axis spanned the two
  processes; the run resumes (a) on 1 process and (b) on 2 processes with the batch axis
  across them, and both end with the state of the uninterrupted run."""
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
  shutil.copytree(workdir, workdir + '_b')
  for path, mesh, processes in ((workdir, (4, 1), 1), (workdir + '_b', (4, 1), 2)):
    outs = _run(path, data_dir, mesh, processes, 4 // processes, flags=flags)
    assert f'Resuming from step {saved[0].group(1)}' in outs[0]
    _assert_close(_final_state(data_dir, path), single_process)
  # A slice whose branch axis (3) does not split the 4 branches: refused, naming the sizes
  # that fit, before anything is written.
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  procs = _start(workdir, data_dir, (1, 3), 1, 3)
  out = procs[0].communicate(timeout=300)[0]
  assert procs[0].returncode == 2, out[-3000:]
  assert ('num_branches=4 is not divisible by the mesh branch axis size 3. Use a branch '
          'count (and, stagewise, branches_per_stage) that is a multiple of 3, or a branch '
          'axis size in [1, 2, 4].') in out
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


@pytest.mark.slow
def test_a_killed_input_worker_on_one_process_stops_both(data_dir, tmp_path):
  """kill -9 of process 1's grain worker: process 1 says so (exit 2) and stops; process 0
  loses it (exit 75) within the watchdog's time."""
  workdir = str(tmp_path / 'run')
  with open(workdir + '_process1.log', 'w') as log1:
    procs = _start(workdir, data_dir, (4, 1), 2, 2, ['--config.workers=1',
                                                     '--config.training.epochs=2',
                                                     '--config.log_every_steps=1'],
                   logs=[None, log1])
    for line in procs[0].stdout:
      if 'step 2/26' in line:
        workers = subprocess.run(['pgrep', '-P', str(procs[1].pid)], capture_output=True,
                                 text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGKILL)
        t0 = time.monotonic()
        break
    out0 = procs[0].communicate(timeout=300)[0]
    codes = [p.wait(timeout=60) for p in procs]
    exited_s = time.monotonic() - t0
  with open(workdir + '_process1.log') as f:
    out1 = f.read()
  assert codes == [75, 2], out0[-2000:] + '\nprocess 1:\n' + out1[-2000:]
  assert exited_s < 35  # README: within 35 s (the watchdog's 20 s of silence, then the stop)
  assert 'error: An input worker process died (' in out1
  assert 'error: lost process 1 of this run' in out0


_AGREE_CHILD = """
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from paraformer_jax import checkpoint, cli
ckpts = checkpoint.Checkpoints(sys.argv[3 + jax.process_index()], create=False)
try:
  print('agreed', ckpts.agreed_latest_step(), flush=True)
except FileNotFoundError as e:
  cli.exit_with(e)
"""


@pytest.mark.slow
def test_every_process_resumes_from_the_step_process_0_lists(tmp_path):
  """Process 1 lists a stale copy of the checkpoints (its latest step missing, as a cached
  listing would): with one step missing, both stop with a message naming the step and the
  directory; with an older extra step only it, both agree on process 0's latest."""
  from paraformer_jax import checkpoint
  import jax.numpy as jnp
  full = tmp_path / 'p0' / 'checkpoints'
  ckpts = checkpoint.Checkpoints(full, keep=None, keep_best=False)
  for step in (5, 10):
    ckpts.save(step, {'w': jnp.full((2,), step)}, {'stage': 0})
  ckpts.wait()
  stale = tmp_path / 'p1' / 'checkpoints'
  shutil.copytree(full, stale)
  shutil.rmtree(stale / '10')
  results = []
  for listing in (stale, full):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, '-c', _AGREE_CHILD, f'127.0.0.1:{port}', str(i),
                               str(full), str(listing)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
             for i in range(2)]
    results.append([(p.communicate(timeout=120)[0], p.returncode) for p in procs])
  for (out, code), listed in zip(results[0], (full, stale)):  # each names its directory
    assert code == 2, out[-2000:]
    assert (f'error: Process 0 resumes from step 10 in {listed}, which process(es) 1 cannot '
            f'read there') in out
  assert [code for _, code in results[1]] == [0, 0]
  assert all('agreed 10' in out for out, _ in results[1])


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='module')
def stagewise_runs(data_dir, tmp_path_factory):
  """Workdirs of a stagewise run: {'one': on one process; 'killed': on two, process 1 killed
  (kill -9) as stage 2 compiles, then the same command again on both; 'other_slice': a copy
  of the killed run's workdir resumed on 1 process with the batch axis instead}, and what
  process 0 printed, and how long it took to exit, after the kill."""
  runs = {n: str(tmp_path_factory.mktemp(n)) for n in ('one', 'killed', 'other_slice')}
  flags = _flags(STAGEWISE) + ['--config.log_every_steps=2']
  _run(runs['one'], data_dir, (1, 2), processes=1, devices_per_process=2, flags=flags)
  killed = runs['killed']
  with open(os.path.join(killed, 'process1.log'), 'w') as log1:
    procs = _start(killed, data_dir, (1, 2), 2, 1, flags, logs=[None, log1])
    for line in procs[0].stdout:
      if f'stage 2/2 {COMPILING}' in line:
        procs[1].kill()
        t0 = time.monotonic()
        break
    after_kill = procs[0].communicate(timeout=300)[0]
    exited_s = time.monotonic() - t0
  codes = [p.wait(timeout=60) for p in procs]
  shutil.rmtree(runs['other_slice'])
  shutil.copytree(killed, runs['other_slice'])
  for workdir, mesh, processes in ((killed, (1, 2), 2), (runs['other_slice'], (2, 1), 1)):
    outs = _run(workdir, data_dir, mesh, processes, 2 // processes, flags=flags)
    assert 'Resuming from step 15 (stage 0)' in outs[0], outs[0][-3000:]
  return runs, codes, after_kill, exited_s


@pytest.mark.slow
def test_a_killed_process_stops_the_other_at_once_naming_it(stagewise_runs):
  _, codes, after_kill, exited_s = stagewise_runs
  assert codes == [75, -signal.SIGKILL], after_kill[-3000:]
  assert exited_s < 35  # README: within 35 s
  assert 'error: lost process 1 of this run' in after_kill
  assert ('start every process again with the same command to resume from the last one.'
          in after_kill)
  assert 'Traceback' not in after_kill


@pytest.mark.slow
@pytest.mark.parametrize('resumed', ['killed', 'other_slice'])
def test_stagewise_across_processes_equals_one_process(data_dir, stagewise_runs, resumed):
  runs = stagewise_runs[0]
  want, got = (_final_state(data_dir, runs[w], **STAGEWISE) for w in ('one', resumed))
  assert set(got['params']) == {'embed', 'frozen_branches', 'branches', 'head'}
  _assert_close(got, want)


@pytest.mark.slow
def test_expand_across_processes_equals_one_process(data_dir, stagewise_runs, tmp_path):
  """Expansion builds its state from another run's parameters inside jitted functions (as
  init_from does, which the bucket test runs on one process): two new branches beside the
  four of the source, and five new classes."""
  source = 'expand_from'
  overrides = {source: stagewise_runs[0]['one'], 'training.mode': 'joint',
               'model.num_branches': 2, 'data.classes': '5-9'}
  results = []
  for processes in (1, 2):
    workdir = str(tmp_path / f'p{processes}')
    outs = _run(workdir, data_dir, (1, 2), processes, 2 // processes, _flags(overrides))
    assert f'Parameters from {stagewise_runs[0]["one"]}' in outs[0]
    results.append(_final_params(data_dir, workdir, **overrides))
  _assert_close(results[1], results[0])
