"""The command line as a newcomer meets it: every refusal one message, exit 2, nothing written."""
import os
import subprocess
import sys

import re

import pytest

from paraformer_jax import input_pipeline

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
                               None),
    'dataset typo': (['--config.data.name=sklearn_digitz'],
                     "error: Unknown dataset 'sklearn_digitz' (config.data.name). Did you mean "
                     "'sklearn_digits'? Use a TFDS name such as 'cifar10', 'imagenet2012' or "
                     "'sklearn_digits'.", None),
    'eval of a missing workdir': (['--mode=eval'],
                                  'error: No checkpoint in {workdir}/checkpoints: train first '
                                  'with --mode=train, or pass the --workdir of a trained run.',
                                  None),
    'expand_from typo': (['--config.expand_from={root}/no_such_run'],
                         "error: config.expand_from='{root}/no_such_run' holds no checkpoint in "
                         '{root}/no_such_run/checkpoints; point it at the workdir of a trained '
                         'run.', None),
    'missing config file': (['--config=configs/nope.py'],
                            'error: --config=configs/nope.py does not load: [Errno 2] No such '
                            "file or directory: 'configs/nope.py'",
                            'Pass a config file, e.g. --config=configs/digits.py.'),
}


@pytest.fixture(scope='module')
def refusals(tmp_path_factory):
  """{case: (exit code, stdout, stderr, workdir, root)}, the processes run side by side."""
  root = str(tmp_path_factory.mktemp('refusals'))
  data_dir = os.path.join(root, 'tfds')
  input_pipeline.get_source('sklearn_digits', 'train', data_dir)  # built once, here
  env = dict(os.environ, PARAFORMER_VERBOSE='')
  procs = {}
  for name, (args, _, _) in CASES.items():
    workdir = os.path.join(root, name.replace(' ', '_'))
    args = [a.format(root=root) for a in args]
    if not any(a.startswith('--config=') for a in args):
      args = ['--config=configs/digits.py', f'--config.data.data_dir={data_dir}', *args]
    cmd = [sys.executable, '-m', 'paraformer_jax.main', f'--workdir={workdir}', *args]
    procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True), workdir)
  done = {}
  for name, (proc, workdir) in procs.items():
    out, err = proc.communicate(timeout=300)
    done[name] = (proc.returncode, out, err, workdir, root)
  return done


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_a_refusal_is_one_message_with_exit_2_and_writes_nothing(refusals, case):
  code, out, err, workdir, root = refusals[case]
  _, first, last = CASES[case]
  first = first.format(workdir=workdir, root=root)
  ours = [l for l in err.strip().splitlines() if not LIBTPU_NOISE.search(l)]
  assert code == 2, err[-3000:]
  assert ours[0] == first, err[-3000:]
  if last:
    assert ours[-1] == last
  assert len(ours) <= 3 and 'Traceback' not in err, err[-3000:]
  assert not os.path.exists(workdir) and not os.path.exists(os.path.join(root, 'no_such_run'))
  assert sorted(os.listdir(root)) == ['tfds']


@pytest.mark.slow
def test_verbose_keeps_the_traceback(tmp_path):
  cmd = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/digits.py',
         f'--workdir={tmp_path / "w"}', f'--config.data.data_dir={tmp_path / "tfds"}',
         '--config.model.num_branches=0', '--verbose']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert 'Traceback' in out.stderr
  assert out.stderr.strip().endswith('ValueError: config.model.num_branches=0: use an '
                                     'integer >= 1.')


def test_prefix_plot_has_a_fixed_axis_a_legend_and_marks_the_frozen_branches():
  from paraformer_jax import reporting
  rows = [{'branches': k, 'params': 1000 * k, 'accuracy': 0.098 + 0.001 * k} for k in (1, 2, 3)]
  fig = reporting.prefix_figure(rows, 'run (joint): digits test, step 5', 10, frozen=2)
  ax = fig.axes[0]
  assert ax.get_ylim() == (0, 100)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      'test accuracy', 'chance (10.0%)', 'old run: branches 1-2 (frozen)',
      'parameters (M, right axis)']
  assert ax.get_title() == 'run (joint): digits test, step 5'


@pytest.mark.slow
def test_the_corrected_command_works_in_the_workdir_of_a_refused_one(tmp_path):
  base = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/tiny.py',
          f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "tfds"}',
          '--config.training.epochs=1']
  refused = subprocess.run(base + ['--config.model.num_branches=0'], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and not os.path.exists(tmp_path / 'run')
  fixed = subprocess.run(base + ['--config.model.num_branches=2'], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert fixed.returncode == 0, fixed.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'run')) == [
      'checkpoints', 'config.json', 'final_prefix_accuracy.json', 'final_prefix_accuracy.png',
      'metrics.jsonl', 'tensorboard']


def test_the_readme_documents_the_commands_its_figures_come_from():
  """docs/readme_examples.py regenerates the README's figures by running these commands:
  they must be the ones the README shows, and every marked block must be one it writes."""
  sys.path.insert(0, os.path.join(REPO, 'docs'))
  import readme_examples
  readme = open(os.path.join(REPO, 'README.md')).read()
  assert readme_examples.missing_commands(readme) == []
  names = [m.group(2) for m in readme_examples.BLOCK.finditer(readme)]
  assert sorted(names) == ['compress', 'digits', 'expansion']
  marked = readme_examples.rewrite(readme, {n: f'<{n}>' for n in names})
  assert all(f'<{n}>' in marked for n in names) and 'final (step' not in marked


def test_first_ctrl_c_asks_to_save_and_the_second_stops_at_once():
  import signal
  from paraformer_jax.preemption import Preemption
  before = signal.getsignal(signal.SIGINT)
  with Preemption() as preemption:
    assert preemption.requested() == 0
    os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: no exception
    assert preemption.requested() == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # give the handler a bytecode boundary to run at
        pass
  assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_progress_rate_leaves_out_the_steps_that_compiled(monkeypatch):
  from paraformer_jax import train
  now = [0.0]
  monkeypatch.setattr(train.time, 'perf_counter', lambda: now[0])
  clock = train._Clock(start=0)
  now[0] = 50.0  # step 1 compiled the LPA pass program: 50 s
  clock.tick(1, compiled=True)
  assert clock.rate(1, 100, 10) == (None, None)  # nothing timed yet
  now[0] = 52.0  # steps 2..3 at 1 s each
  clock.tick(3, compiled=True)
  now[0] = 62.0  # step 4 compiled the full pass program (10 s)
  clock.tick(4, compiled=False)
  now[0] = 64.0  # steps 5..6 at 1 s each
  clock.tick(6, compiled=False)
  ips, eta = clock.rate(6, 100, 10)
  assert ips == pytest.approx(10.0) and eta == pytest.approx(94.0)


def test_train_seconds_count_the_compiling_steps_at_the_mean_of_the_others():
  from paraformer_jax import train
  clock = train._Clock(start=0)
  # lpa: step 1 compiles the LPA pass (50 s), step 3 the full pass (10 s); others 1 or 3 s.
  for done, compiled, seconds in ((1, True, 50.0), (2, True, 1.0), (3, False, 10.0),
                                  (4, False, 3.0)):
    clock.tick(done, compiled=compiled, seconds=seconds)
  assert clock.train_seconds(4) == pytest.approx(4 * (1.0 + 3.0) / 2)
