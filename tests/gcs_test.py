"""A run whose workdir is in a bucket (gs://), against a real GCS-compatible server on
127.0.0.1 (the `gcs` fixture): train, preemption and resume, evaluation, compression and
fine-tuning, with nothing written to the local working directory."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from conftest import copy_to_bucket, preempt_at
from train_test import tiny_config, trees_equal

from paraformer_jax import input_pipeline, storage, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))  # outside the working directory
  input_pipeline.get_source('sklearn_digits', 'train', path)  # prepared once, here
  return path


def _bucket(path):
  """epath.Path of `path`, after dropping gcsfs's cached listings (the runs write from other
  processes, which this one's cache does not see)."""
  epath.backend.fsspec_backend.fs('gs://').invalidate_cache()
  return epath.Path(path)


def _cmd(data_dir, workdir, *flags):
  return [sys.executable, '-m', 'paraformer_jax.main', f'--config={REPO}/configs/tiny.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.training.epochs=1', '--config.log_every_steps=2', *flags]


def _main(cwd, data_dir, workdir, *flags, check=True):
  out = subprocess.run(_cmd(data_dir, workdir, *flags), cwd=cwd, env={**os.environ, **ENV},
                       capture_output=True, text=True, timeout=600)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def _preempted_then_resumed(cwd, data_dir, workdir):
  proc = subprocess.Popen(_cmd(data_dir, workdir), cwd=cwd, env={**os.environ, **ENV},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = preempt_at([proc], 'step 4/13')
  assert any('Preempted: saved step' in line for line in lines), ''.join(lines[-30:])
  resumed = _main(cwd, data_dir, workdir)
  assert 'Resuming from step' in resumed.stderr


@pytest.mark.slow
def test_a_run_in_a_bucket_end_to_end(gcs, data_dir, tmp_path):
  del gcs
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  straight, preempted = 'gs://bucket/straight', 'gs://bucket/preempted'
  # Its data in the bucket too, read by a worker process; the other run's is local.
  _main(cwd, copy_to_bucket(data_dir, 'sklearn_digits'), straight,
        '--config.profile_steps=(2, 2)', '--config.workers=1')
  _preempted_then_resumed(cwd, data_dir, preempted)
  # The profile of steps 2..3, traced locally, is copied to the bucket.
  traces = list(_bucket(straight + '/profile').glob('plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().length > 1000

  # What a run writes is in the bucket.
  names = {p.name for p in _bucket(preempted).iterdir()}
  assert {'checkpoints', 'config.json', 'metrics.jsonl', 'tensorboard',
          'final_prefix_accuracy.json', 'final_prefix_accuracy.png'} <= names
  logged = [json.loads(l) for l in (_bucket(preempted) / 'metrics.jsonl').read_text()
            .splitlines()]
  assert {'loss', 'val_accuracy'} <= {k for m in logged for k in m}
  assert any(p.name.startswith('events') for p in (_bucket(preempted) / 'tensorboard')
             .iterdir())
  # Resumed from the bucket, bit-identical to the run that was never interrupted (and that
  # read its data from the bucket).
  config = tiny_config(data_dir, epochs=1)
  want, got = (train.Trainer(config, w, create=False) for w in (straight, preempted))
  assert got.ckpts.latest_step() == want.ckpts.latest_step() == 13
  a, b = (t.restore(13)[0] for t in (want, got))
  assert trees_equal(a.params, b.params) and trees_equal(a.opt_state, b.opt_state)

  # Evaluation, compression and fine-tuning read it from there and write there.
  _main(cwd, data_dir, preempted, '--mode=eval')
  final = json.loads((_bucket(preempted) / 'final_prefix_accuracy.json').read_text())
  evaluated = json.loads((_bucket(preempted) / 'eval_step13_prefix_accuracy.json')
                         .read_text())
  assert evaluated['prefixes'] == final['prefixes']
  out = subprocess.run(
      [sys.executable, '-m', 'paraformer_jax.compress', f'--config={REPO}/configs/tiny.py',
       f'--workdir={preempted}', '--out=gs://bucket/small', '--k=2',
       f'--config.data.data_dir={data_dir}'], cwd=cwd, env={**os.environ, **ENV},
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(_bucket('gs://bucket/small/compression.json').read_text())
  assert report['k'] == 2 and report['source'] == preempted
  tuned = _main(cwd, data_dir, 'gs://bucket/tuned', f'--config.init_from={preempted}',
                '--config.training.learning_rate=1e-30')
  assert f'Parameters from {preempted}' in tuned.stderr
  # With a learning rate of 1e-30 the fine-tuned run keeps what it was given.
  start = train.Trainer(config, 'gs://bucket/tuned', create=False).restore(13)[0]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-20),
               start.params, a.params)

  assert os.listdir(cwd) == []  # nothing local: no gs:/ folders, no stray files


def test_a_missing_bucket_fails_before_training_and_names_it(gcs, data_dir, tmp_path):
  del gcs
  out = _main(tmp_path, data_dir, 'gs://no-such-bucket/run', check=False)
  assert out.returncode != 0
  assert ('--workdir=gs://no-such-bucket/run cannot be used: the bucket gs://no-such-bucket '
          'does not exist') in out.stderr
  assert 'Resuming' not in out.stderr and 'branches trained' not in out.stderr
  assert os.listdir(tmp_path) == []


def test_an_unreachable_endpoint_fails_within_the_probe_time(tmp_path):
  with __import__('socket').socket() as s:
    s.bind(('127.0.0.1', 0))
    closed = s.getsockname()[1]  # nothing listens once the socket is closed
  env = {**os.environ, 'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{closed}',
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  # The checks a run makes before anything else (run_checks.check_sources): the dataset's
  # bucket, then the workdir's.
  code = ('from configs import tiny\nfrom paraformer_jax import run_checks, storage\n'
          'storage.PROBE_TIMEOUT_S = 3\nconfig = tiny.get_config()\n'
          'config.data.data_dir = "gs://bucket/tfds"\n'
          'for workdir in ("local_run", "gs://bucket/run"):\n'
          '  try:\n'
          '    run_checks.check_sources(config, workdir)\n'
          '  except OSError as e:\n'
          '    print(e)\n'
          '  config.data.data_dir = ""\n')
  out = subprocess.run([sys.executable, '-c', code], env={**env, 'PYTHONPATH': REPO},
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  data, workdir = out.stdout.splitlines()
  assert data.startswith('config.data.data_dir=gs://bucket/tfds cannot be used: no answer '
                         'from the storage endpoint within 3 s')
  assert workdir.startswith('--workdir=gs://bucket/run cannot be used: no answer from the '
                            'storage endpoint within 3 s')
  assert f'STORAGE_EMULATOR_HOST=http://127.0.0.1:{closed}' in workdir
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_imagenet_jpegs_in_a_bucket_give_the_batches_of_the_local_copy(gcs, photos_dir):
  """The sample-photos imagenet2012 copied up: its JPEGs read from the bucket through
  array_record's C++ reader, by two worker processes, make the local copy's batches."""
  del gcs
  from configs import imagenet
  bucket = copy_to_bucket(photos_dir, 'imagenet2012', 'gs://bucket/photos_tfds')
  data = imagenet.get_config().data
  local, remote = (input_pipeline.get_source('imagenet2012', 'train', d)
                   for d in (photos_dir, bucket))
  assert len(remote) == len(local) == 300
  want, got = (input_pipeline.train_batches(source, data, 8, seed=2)
               for source in (local, remote))
  it = input_pipeline.iterate(got, 5, workers=2)
  for b in (5, 6):
    batch = next(it)
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(batch[key], want[b][key])
  it.close()


def test_a_bucket_without_the_dataset_says_how_to_copy_it_there(gcs):
  del gcs
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.get_source('sklearn_digits', 'train', 'gs://bucket/empty_tfds')
  assert ("Dataset 'sklearn_digits' is not prepared as array_record in "
          "data_dir='gs://bucket/empty_tfds'") in str(e.value)
  assert 'gcloud storage cp -r /tmp/tfds/sklearn_digits gs://bucket/empty_tfds/' in str(e.value)
  assert not _bucket('gs://bucket/empty_tfds').exists()  # nothing written there


def test_atomic_writes_leave_no_temporary_file(gcs, tmp_path):
  del gcs
  for target in (tmp_path / 'a.json', 'gs://bucket/atomic/a.json'):
    storage.write_atomic(target, '{"x": 1}')
    storage.write_atomic(target, '{"x": 2}')
    assert storage.path(target).read_text() == '{"x": 2}'
    assert [p.name for p in storage.path(target).parent.iterdir()] == ['a.json']


def test_metrics_of_a_resumed_run_follow_the_earlier_ones(gcs, tmp_path):
  """Locally appended, on a bucket rewritten whole: either way every line is kept, once."""
  del gcs
  from paraformer_jax import reporting
  for workdir in (tmp_path / 'run', 'gs://bucket/metrics_run'):
    for steps in ([1, 2], [3]):  # a run, then its resumption
      writer = reporting.MetricWriter(workdir)
      for step in steps:
        writer.write(step, {'loss': float(step)})
      writer.close()
    lines = _bucket(storage.path(workdir) / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{'step': s, 'loss': float(s)}
                                                    for s in (1, 2, 3)]


_CACHE_CHILD = '''
import json
import jax
import jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda name, **_: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
value = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(16.0).reshape(4, 4))
print(json.dumps({'value': float(value), 'hits': len(hits)}))
'''


def test_jax_compilation_cache_in_a_bucket_is_written_then_loaded(gcs):
  """The README's persistent compilation cache with a gs:// directory, as a pod run would
  set it: JAX writes the compiled program through etils.epath (gcsfs here) and a second
  process loads it from the bucket instead of compiling."""
  env = {**os.environ, **ENV, 'JAX_COMPILATION_CACHE_DIR': 'gs://bucket/xla_cache',
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  runs = []
  for _ in range(2):
    out = subprocess.run([sys.executable, '-c', _CACHE_CHILD], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    runs.append(json.loads(out.stdout.splitlines()[-1]))
  assert runs[0]['hits'] == 0 and runs[1]['hits'] >= 1
  assert runs[0]['value'] == runs[1]['value']
  assert [p.name for p in _bucket('gs://bucket/xla_cache').iterdir()
          if p.name.startswith('jit_')]
