"""The command line as a newcomer meets it: every refusal one message, exit 2, nothing written."""
import os
import subprocess
import sys

import re

import pytest

from configs import digits
from paraformer_jax import input_pipeline, run_checks

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
    'workdir that is a file': (['--workdir={root}/a_file'],
                               'error: --workdir={root}/a_file is a file; pass a directory: a new '
                               'one, or the workdir of a run to resume.', None),
    'dtype shorthand': (['--config.model.dtype=bf16'],
                        "error: config.model.dtype='bf16': use one of ('float32', 'bfloat16'), "
                        'e.g. --config.model.dtype=bfloat16.', None),
    'randaugment name': (['--config.data.randaugment=torchvision'],
                         "error: config.data.randaugment='torchvision': use 'authors' (their "
                         "randomaug.py, magnitudes 0..30) or 'big_vision' (TF autoaugment's "
                         "randaug, 0..10).", None),
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
    'profile beyond the run': (['--config.profile_steps=(758, 5)'],
                               'error: config.profile_steps=(758, 5): use (first step, count) '
                               'with first >= 0, count >= 1 and first + count <= 760 (the '
                               'run\'s steps), e.g. --config.profile_steps="(10, 5)"; or () for '
                               'none.', None),
    'negative checkpoint interval': (['--config.checkpoint_every_minutes=-1'],
                                     'error: config.checkpoint_every_minutes=-1.0: use 0 (off) '
                                     'or a number of minutes > 0.', None),
    'missing config file': (['--config=configs/nope.py'],
                            'error: --config=configs/nope.py does not load: [Errno 2] No such '
                            "file or directory: 'configs/nope.py'",
                            'Pass a config file, e.g. --config=configs/digits.py.'),
    'config argument it does not take': (
        ['--config=configs/digits.py:bogus'],
        'error: flag --config=configs/digits.py:bogus does not load: TypeError: get_config() '
        'takes 0 positional arguments but 1 was given (the text after ":" goes to '
        'get_config(); this config takes none). Check the config file and its argument.', None),
    'config.json as the config': (
        ['--config={root}/digits_run/config.json'],
        "error: --config={root}/digits_run/config.json: config.json records a run's settings; "
        'a config is a Python file. Pass {root}/digits_run/config.py, written beside it (a '
        'workdir from before it was written: --config=configs/<its config>.py with the '
        'overrides config.json lists).', None),
    'stray argument': (['train'],
                       "error: Unexpected argument(s) ['train']: every setting is a flag, e.g. "
                       '--config.seed=1 (a value with spaces goes in quotes); pass --help for '
                       'the flags.', None),
    'read-only workdir': (['--workdir=/sys/paraformer_run'],
                          'error: --workdir=/sys/paraformer_run cannot be written (Operation not '
                          'permitted); pass a directory on a disk or bucket this process may '
                          'write to.', None),
    'missing init_from': (['--config.init_from={root}/no_such_run'],
                          "error: '{root}/no_such_run' (config.init_from or config.expand_from) "
                          'holds no checkpoint in {root}/no_such_run/checkpoints; point it at '
                          'the workdir of a trained run.', None),
    'a model that cannot fit': (
        ['--config.model.num_branches=1000000'],
        'error: The model does not fit: 33,280,002,250 parameters (model.num_branches=1000000, '
        'branch_depth=1, width=64) need ', None),
    'compress: negative tolerance': (
        ['-m=paraformer_jax.compress', '--workdir={root}/digits_run', '--out={workdir}',
         '--tolerance=-1'],
        'error: --tolerance=-1: use a share of accuracy in [0, 1), e.g. --tolerance=0.02 for 2 '
        'points below the full model.', None),
    "compress: another run's config": (
        ['-m=paraformer_jax.compress', '--config=configs/cifar10.py',
         '--workdir={root}/digits_run', '--out={workdir}'],
        'error: {root}/digits_run holds a run made with other settings:',
        'Use a new --workdir (the checkpoints there are kept), or its settings: '
        '--config={root}/digits_run/config.py.'),
}


@pytest.fixture(scope='module')
def refusals(tmp_path_factory):
  """{case: (exit code, stdout, stderr, workdir, root)}, the processes run side by side."""
  root = str(tmp_path_factory.mktemp('refusals'))
  data_dir = os.path.join(root, 'tfds')
  input_pipeline.get_source('sklearn_digits', 'train', data_dir)  # built once, here
  with open(os.path.join(root, 'a_file'), 'w') as f:  # a --workdir that is a file
    f.write('kept')
  # The settings of a digits run (its config.json and config.py), as training writes them.
  os.mkdir(os.path.join(root, 'digits_run'))
  run_checks.save_config(digits.get_config(), os.path.join(root, 'digits_run'), False)
  env = dict(os.environ, PARAFORMER_VERBOSE='')
  procs = {}
  for name, (args, _, _) in CASES.items():
    workdir = os.path.join(root, re.sub(r'\W+', '_', name))
    args = [a.format(root=root, workdir=workdir) for a in args]
    module = 'paraformer_jax.main'
    if args[0].startswith('-m='):
      module, args = args[0][3:], args[1:]
    if not any(a.startswith('--config=') for a in args):
      args = ['--config=configs/digits.py', f'--config.data.data_dir={data_dir}', *args]
    if not any(a.startswith('--workdir=') for a in args):
      args = [f'--workdir={workdir}', *args]
    cmd = [sys.executable, '-m', module, *args]
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
  assert ours[0] == first or first.endswith(' ') and ours[0].startswith(first), err[-3000:]
  if last:
    assert ours[-1] == last.format(workdir=workdir, root=root)
  # At most 3 lines besides a list of what differs (indented), and no traceback.
  assert len([l for l in ours if not l.startswith('  ')]) <= 3, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert not os.path.exists(workdir) and not os.path.exists(os.path.join(root, 'no_such_run'))
  assert sorted(os.listdir(root)) == ['a_file', 'digits_run', 'tfds']
  assert sorted(os.listdir(os.path.join(root, 'digits_run'))) == ['config.json', 'config.py']
  with open(os.path.join(root, 'a_file')) as f:
    assert f.read() == 'kept'


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
      'checkpoints', 'config.json', 'config.py', 'final_prefix_accuracy.json',
      'final_prefix_accuracy.png', 'metrics.jsonl', 'tensorboard']


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


def test_readme_check_allows_the_stated_tolerance_and_no_more():
  sys.path.insert(0, os.path.join(REPO, 'docs'))
  import readme_examples as rx
  tol, rel = 3.0, 0.2  # README.md: "within 3 points ... and every other number within 20%"
  doc = 'it kept 6 branches: 93.89% validation, 1.33x fewer, step 665'
  within = f'it kept 6 branches: {93.89 + tol - 0.01:.2f}% validation, 1.33x fewer, step 665'
  assert rx.differences(doc, within) == []
  beyond = f'it kept 6 branches: {93.89 - tol - 0.01:.2f}% validation, 1.33x fewer, step 665'
  assert len(rx.differences(doc, beyond)) == 1
  far_step = f'it kept 6 branches: 93.89% validation, 1.33x fewer, step {665 * (1 + rel) + 1:.0f}'
  assert len(rx.differences(doc, far_step)) == 1
  assert rx.differences(doc, doc.replace('validation', 'test')) == [
      'the text around the figures differs']


def test_first_ctrl_c_asks_to_save_and_the_second_stops_at_once():
  import signal
  from paraformer_jax.preemption import Preemption
  before = signal.getsignal(signal.SIGINT)
  with Preemption() as preemption:
    assert preemption.requested(1) == 0
    os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: no exception
    assert preemption.requested(2) == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # give the handler a bytecode boundary to run at
        pass
  assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_the_loop_clock_times_the_steps_after_each_compile_and_gives_mfu(monkeypatch):
  import types

  import jax

  from paraformer_jax import telemetry
  now = [0.0]
  monkeypatch.setattr(telemetry.time, 'perf_counter', lambda: now[0])
  v5e = [types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')] * 4
  clock = telemetry.LoopClock(0, v5e)
  now[0] = 50.0  # step 1 compiled (50 s): the loop waits for it and restarts the clock
  clock.tick(1, 'lpa pass', 1e12)
  clock.restart()
  now[0] = 52.0  # steps 2..3: 1 s each, 0.5 s of it waiting for input, 197e12 FLOPs each
  clock.waited_for_input(0.5)
  clock.tick(2, 'lpa pass', 197e12)
  clock.tick(3, 'lpa pass', 197e12)
  got = clock.interval(batch_size=8, dtype='bfloat16')
  assert got == pytest.approx({'step_s': 1.0, 'input_wait_s': 0.25, 'images_per_s': 8.0,
                               'images_per_s_per_chip': 2.0, 'tflops_per_chip': 197 / 4,
                               'mfu': 0.25})  # 49.25 of the v5e chip's 197 TFLOP/s
  assert clock.interval(8, 'bfloat16') is None  # no step since
  now[0] = 62.0  # step 4 compiled the full pass program (10 s), step 5 took 3 s
  clock.tick(4, 'full pass', 1e12)
  clock.restart()
  now[0] = 65.0
  clock.tick(5, 'full pass', 1e12)
  assert clock.interval(8, 'bfloat16')['step_s'] == pytest.approx(3.0)
  # Compiling steps count at the mean of the timed ones: (1 + 1 + 3) / 3 s.
  assert clock.train_seconds(6) == pytest.approx(6 * 5 / 3)
  assert clock.eta(3) == pytest.approx(3 * 5 / 3)
  cpu = telemetry.LoopClock(0, jax.devices()[:2])
  cpu.tick(1, 'step', 1e9)
  now[0] = 66.0
  assert 'mfu' not in cpu.interval(8, 'float32')  # no peak for a CPU


def test_chips_are_found_by_the_device_kind_jax_reports():
  from paraformer_jax import chips
  assert chips.lookup('TPU v5 lite').hbm_gib == 16  # v5e, not v5p
  assert chips.lookup('TPU v5').hbm_gib == 95
  assert chips.lookup('NVIDIA H100 80GB HBM3').bf16_tflops == 989
  assert chips.lookup('NVIDIA H100 PCIe').bf16_tflops == 756
  assert chips.lookup('NVIDIA H200').peak_tflops('float32') == 67
  assert chips.lookup('cpu') is None
