"""The command line as a newcomer meets it: every refusal one message, exit 2, nothing written."""
import os
import subprocess
import sys

import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What libtpu (installed by requirements-test.txt for the TPU compile checks) prints when
# JAX looks for a TPU on a machine without one.
LIBTPU_NOISE = re.compile(r'TPU|InitGoogle|Source Location Trace|libtpu|^E0000|^learning/')

# (extra arguments, the error's first line, its last line)
CASES = {
    'field typo': (['--config.model.num_brances=3'],
                   "error: --config.model.num_brances: the config has no field 'num_brances'; "
                   'did you mean --config.model.num_branches?', None),
    'negative learning rate': (['--config.training.learning_rate=-1e-3'],
                               'error: config.training.learning_rate=-0.001: use a number > 0.',
                               '(run again with --verbose for the traceback)'),
    'dataset typo': (['--config.data.name=sklearn_digitz'],
                     "error: Unknown dataset 'sklearn_digitz' (config.data.name). Did you mean "
                     "'sklearn_digits'? Use a TFDS name such as 'cifar10', 'imagenet2012' or "
                     "'sklearn_digits'.", None),
    'missing config file': (['--config=configs/nope.py'],
                            'error: --config=configs/nope.py does not load: [Errno 2] No such '
                            "file or directory: 'configs/nope.py'",
                            'Pass a config file, e.g. --config=configs/digits.py.'),
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))  # stays empty: every case stops before reading


@pytest.fixture(scope='module')
def refusals(data_dir, tmp_path_factory):
  """{case: (completed process, its workdir)}, the processes run two at a time."""
  root = tmp_path_factory.mktemp('refusals')
  env = dict(os.environ, PARAFORMER_VERBOSE='')
  procs = {}
  for name, (args, _, _) in CASES.items():
    workdir = str(root / name.replace(' ', '_'))
    if not any(a.startswith('--config=') for a in args):
      args = ['--config=configs/digits.py', f'--config.data.data_dir={data_dir}', *args]
    cmd = [sys.executable, '-m', 'paraformer_jax.main', f'--workdir={workdir}', *args]
    procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True), workdir)
  done = {}
  for name, (proc, workdir) in procs.items():
    out, err = proc.communicate(timeout=300)
    done[name] = (proc.returncode, out, err, workdir)
  return done


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_a_refusal_is_one_message_with_exit_2_and_writes_nothing(refusals, case):
  code, out, err, workdir = refusals[case]
  _, first, last = CASES[case]
  ours = [l for l in err.strip().splitlines() if not LIBTPU_NOISE.search(l)]
  assert code == 2, err[-3000:]
  assert ours[0] == first, err[-3000:]
  if last:
    assert ours[-1] == last
  assert len(ours) <= 3 and 'Traceback' not in err, err[-3000:]
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_verbose_keeps_the_traceback(data_dir, tmp_path):
  cmd = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/digits.py',
         f'--workdir={tmp_path / "w"}', f'--config.data.data_dir={data_dir}',
         '--config.model.num_branches=0', '--verbose']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert 'Traceback' in out.stderr
  assert out.stderr.strip().endswith('ValueError: config.model.num_branches=0: use an '
                                     'integer >= 1.')
