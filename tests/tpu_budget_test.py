"""Per-chip memory budgets of real training steps on the TPU compiler (libtpu; no TPU needed).

A change that makes a TPU step keep more in HBM fails here, before it reaches a pod: the
suite's other TPU compiles use the tiny config, whose programs are too small to show it. The
budgets are libtpu's temporaries per chip at the pinned libtpu (requirements-test.txt). A
change that lowers one fails too, with the new figure to record, so that every budget stays
tight enough to catch the next regression.

Each compile takes ~35 s on a 2-core machine. They run in a process of their own, started
when this module is collected (conftest.py), so that they overlap with the rest of the suite.

Not here: the paper's 32 px `lpa` pass step (configs/cifar10.py:32px), whose TPU compile took
354 s and 6.5 GB of host memory on the 2-core CI machine, too long for the suite; its figure
is in docs/benchmarks.md, from `python -m paraformer_jax.aot --config=configs/cifar10.py:32px
--topology=v5e:2x2`.

  .venv/bin/python tests/tpu_budget_test.py  # each program's figures, as JSON
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config[:variant], overrides, topology, global batch (None: the config's),
#        budget: temporaries per chip in bytes).
PROGRAMS = {
    # The headline run's step at a batch that compiles quickly: 16 examples per chip. Its
    # global average pooling runs every branch's last block on every token (cls pooling
    # needs only the cls token's query there): 496,379,904 bytes with pool='cls'.
    # Dropout on (the config has none, as big_vision's): its masks are what once grew 11x.
    'imagenet lpa_fused, batch 64, v5e:2x2': ('imagenet', {'model.dropout': 0.1}, 'v5e:2x2', 64,
                                              813_429_760),
    # The paper's model (reference blocks, float32) in its joint step.
    'cifar10:32px joint, batch 500, v5e:2x2': ('cifar10:32px', {'training.mode': 'joint'},
                                               'v5e:2x2', None, 881_004_544),
}
# The pinned libtpu compiles these programs to the same byte count on every run and machine
# seen, so 1% only absorbs a padding step; a removed rematerialization (+7%) fails.
TOLERANCE = 0.01
TIMEOUT_S = 600


def measure(name):
  """The figures of PROGRAMS[name], compiled in this process."""
  import importlib

  from paraformer_jax import aot
  config_name, overrides, topology, batch, _ = PROGRAMS[name]
  module, _, variant = config_name.partition(':')
  get_config = importlib.import_module(f'configs.{module}').get_config
  config = get_config(variant) if variant else get_config()
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  start = time.perf_counter()
  result = aot.compile_train_step(config, 3, aot.tpu_devices(topology), batch)
  return {'temp_bytes': result.get('temp_bytes'), 'out_of_memory': result['out_of_memory'],
          'compile_s': round(time.perf_counter() - start, 1)}


def _results_dir(run_id: str) -> str:
  return os.path.join(tempfile.gettempdir(), f'paraformer_tpu_budgets_{run_id}')


def start_compiles(run_id: str):
  """Starts this file as a program, in the background, writing every program's figures to
  _results_dir(run_id)/budgets.json. Only the first caller of a test run starts it (with
  pytest-xdist every worker collects this module; one compiles)."""
  folder = _results_dir(run_id)
  try:
    os.mkdir(folder)
  except FileExistsError:
    return
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR='')  # compiled once; nothing to share
  with open(os.path.join(folder, 'log.txt'), 'w') as log:
    subprocess.Popen([sys.executable, os.path.abspath(__file__), folder], cwd=REPO, env=env,
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


_THIS_PROCESS = uuid.uuid4().hex


def run_id(config) -> str:
  """The same string in every process of one pytest run (xdist workers share testrunuid)."""
  return getattr(config, 'workerinput', {}).get('testrunuid') or _THIS_PROCESS


@pytest.fixture(scope='module')
def figures(request):
  folder = _results_dir(run_id(request.config))
  start_compiles(run_id(request.config))  # when collected without conftest's early start
  out, deadline = os.path.join(folder, 'budgets.json'), time.monotonic() + TIMEOUT_S
  while not os.path.exists(out):
    if time.monotonic() > deadline:
      pytest.fail(f'the TPU compiles took over {TIMEOUT_S} s')
    time.sleep(1)
  with open(out) as f:
    results = json.load(f)
  if 'error' in results:
    pytest.fail(f"the TPU compiles failed:\n{results['error'][-5000:]}")
  return results


@pytest.mark.parametrize('name', PROGRAMS)
def test_the_tpu_steps_temporaries_per_chip_are_held_to_its_budget(figures, name):
  budget, got = PROGRAMS[name][-1], figures[name]
  assert got['out_of_memory'] is None, f'{name}: {got["out_of_memory"]["message"]}'
  gib = lambda n: f'{n / 2**30:.3f} GiB ({n:_} bytes)'
  assert got['temp_bytes'] <= (1 + TOLERANCE) * budget, (
      f'{name}: the TPU step needs {gib(got["temp_bytes"])} of temporaries per chip, '
      f'{100 * (got["temp_bytes"] / budget - 1):.0f}% over its budget of {gib(budget)}: '
      f'a change made the TPU program keep more (compare with `python -m paraformer_jax.aot` '
      f'at the last commit that passed)')
  assert got['temp_bytes'] >= (1 - TOLERANCE) * budget, (
      f'{name}: {gib(got["temp_bytes"])} of temporaries per chip, '
      f'{100 * (1 - got["temp_bytes"] / budget):.0f}% under its budget of {gib(budget)}: '
      f'an improvement; record {got["temp_bytes"]:_} as its budget in PROGRAMS')


if __name__ == '__main__':
  import traceback
  try:
    results = {name: measure(name) for name in PROGRAMS}
  except Exception:  # noqa: BLE001 (the suite shows it)
    results = {'error': traceback.format_exc()}
  print(json.dumps(results, indent=1))
  if len(sys.argv) > 1:  # the folder the suite waits on; the file appears complete
    out = os.path.join(sys.argv[1], 'budgets.json')
    with open(out + '.tmp', 'w') as f:
      json.dump(results, f)
    os.replace(out + '.tmp', out)
