"""The training loop as an accelerator host runs it: no per-step wait on the device, the
interval's metrics, checkpoints on a clock, a profile on request."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax._src import array

from configs import tiny
from paraformer_jax import steps, telemetry, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_EVERY = 5


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def loop_config(data_dir, **overrides):
  """13 steps, logged every 5, validated and saved only at the end, no timed saves."""
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.training.epochs = 1
  config.log_every_steps = LOG_EVERY
  config.eval_every_steps = 13
  config.checkpoint_every_minutes = 0.0
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def watched_run(data_dir, tmp_path_factory):
  """A run in which every device-to-host fetch is recorded with the number of train steps
  dispatched before it, and every step's metrics are kept: (config, workdir, fetched-at
  counts, per-step metrics)."""
  config = loop_config(data_dir)
  workdir = str(tmp_path_factory.mktemp('watched'))
  dispatched, fetched_at, per_step, intervals = [0], [], [], []
  real_value, real_make = array.ArrayImpl._value, steps.make_train_step
  real_interval = telemetry.LoopClock.interval

  def interval(clock, *args):
    intervals.append((clock.interval_start, clock.done, clock.flops))
    return real_interval(clock, *args)

  def value(self):
    fetched_at.append(dispatched[0])
    return real_value.fget(self)

  real_ready, real_tree_ready = array.ArrayImpl.block_until_ready, jax.block_until_ready

  def block_until_ready(self):  # a wait without a transfer counts as one too
    fetched_at.append(dispatched[0])
    return real_ready(self)

  def tree_ready(tree):
    fetched_at.append(dispatched[0])
    return real_tree_ready(tree)

  def make_train_step(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def counted(state, batch, **kw):
      dispatched[0] += 1
      state, metrics = step(state, batch, **kw)
      per_step.append(metrics)
      return state, metrics
    return counted
  with pytest.MonkeyPatch.context() as m:
    m.setattr(steps, 'make_train_step', make_train_step)
    m.setattr(array.ArrayImpl, '_value', property(value))
    m.setattr(array.ArrayImpl, 'block_until_ready', block_until_ready)
    m.setattr(jax, 'block_until_ready', tree_ready)
    m.setattr(telemetry.LoopClock, 'interval', interval)
    train.train_and_evaluate(config, workdir)
  per_step = [{k: float(v) for k, v in jax.device_get(s).items()} for s in per_step]
  return config, workdir, fetched_at, per_step, intervals


@pytest.mark.slow
def test_between_log_steps_the_host_never_waits_for_the_device(watched_run):
  _, _, fetched_at, per_step, _ = watched_run
  assert len(per_step) == 13
  # Before the first step (the restored step), after the compiling first step (its time is
  # reported), and at log steps; from 13 on, the final validation and report.
  assert fetched_at and set(fetched_at) <= {0, 1, 5, 10, 13}, sorted(set(fetched_at))
  assert {5, 10} <= set(fetched_at)


@pytest.mark.slow
def test_a_log_line_reports_the_mean_of_its_interval(watched_run):
  _, workdir, _, per_step, _ = watched_run
  logged = {m['step']: m for m in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
            if 'loss' in m}
  assert sorted(logged) == [5, 10, 13]
  for step, first in ((5, 1), (10, 6), (13, 11)):
    for name in ('loss', 'accuracy', 'grad_norm'):
      want = np.mean([m[name] for m in per_step[first - 1:step]])
      assert logged[step][name] == pytest.approx(want, rel=1e-6), (step, name)
  # The loop's timing, from the steps after the compile.
  timing = logged[10]
  assert timing['images_per_s'] == pytest.approx(96 / timing['step_s'])
  assert timing['images_per_s_per_chip'] == pytest.approx(timing['images_per_s'] / 8)
  assert 0 <= timing['input_wait_s'] < timing['step_s'] and timing['tflops_per_chip'] > 0
  assert 'mfu' not in timing  # no peak for a CPU


def test_prefetch_puts_batches_on_the_device_ahead_of_the_step_and_no_more():
  taken, put = [], []

  def batches():
    for i in range(100):
      taken.append(i)
      yield i

  def to_device(b):
    put.append(b)
    return b * 10
  seen = []
  for got in telemetry.prefetch(batches(), to_device, count=5, ahead=2):
    seen.append((got, list(put)))  # what had been put when `got` was handed to the step
  assert [g for g, _ in seen] == [0, 10, 20, 30, 40]
  # Batch i + 1 and i + 2 are on their way while step i runs; none past the count is read.
  assert [p for _, p in seen] == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4],
                                  [0, 1, 2, 3, 4]]
  assert taken == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_an_interval_times_only_the_steps_run_in_it(watched_run):
  """The compiling first step is neither counted nor timed in the interval after it (counted
  without its time, a log line right after a compile read ~20x the real rate)."""
  config, workdir, _, _, intervals = watched_run
  # (first step, last step, FLOPs): steps 2..5 after the compile, 6..10, 11..13.
  assert [(a, b) for a, b, _ in intervals] == [(1, 5), (5, 10), (10, 13)]
  logged = {m['step']: m for m in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
            if 'loss' in m}
  for (first, last, executed), step in zip(intervals, (5, 10, 13)):
    per_step = executed / (last - first)
    assert per_step > 0
    # The TFLOP/s are the interval's FLOPs over its time, per chip of the 8.
    t = logged[step]
    assert t['tflops_per_chip'] == pytest.approx(per_step / t['step_s'] / 8 / 1e12, rel=1e-6)


_KILLED_AFTER_THE_TIMED_SAVE = """
import sys, time
from configs import tiny
from paraformer_jax import checkpoint, train
config = tiny.get_config()
config.data.data_dir = sys.argv[1]
config.training.epochs, config.log_every_steps, config.eval_every_steps = 1, 5, 13
config.checkpoint_every_minutes = 1e-9  # at every log step
real_save = checkpoint.Checkpoints.save
def save(self, step, *args, **kwargs):
  real_save(self, step, *args, **kwargs)
  self.wait()
  print('SAVED', step, flush=True)
  time.sleep(600)  # killed here
checkpoint.Checkpoints.save = save
train.train_and_evaluate(config, sys.argv[2])
"""


@pytest.mark.slow
def test_a_timed_checkpoint_between_validations_survives_kill_9(watched_run, data_dir,
                                                                 tmp_path):
  config, straight, _, _, _ = watched_run
  workdir = str(tmp_path / 'killed')
  proc = subprocess.Popen([sys.executable, '-c', _KILLED_AFTER_THE_TIMED_SAVE, data_dir,
                           workdir], cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
  try:
    saved = []
    for line in proc.stdout:
      if line.startswith('SAVED'):
        saved.append(line)
        proc.kill()  # SIGKILL: no handler runs
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert saved == ['SAVED 5\n'] and proc.returncode == -signal.SIGKILL
  assert train.Trainer(config, workdir).ckpts.all_steps() == [5]  # no validation before 13
  # The same run resumes from it (here with a profile of two steps) to the uninterrupted end.
  resumed = loop_config(config.data.data_dir, profile_steps=(6, 2))
  train.train_and_evaluate(resumed, workdir)
  want, got = (train.Trainer(config, w) for w in (straight, workdir))
  a, b = (t.restore(13)[0] for t in (want, got))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  traces = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(workdir, 'profile'))
            for n in names if n.endswith('.xplane.pb')]
  assert traces and os.path.getsize(traces[0]) > 1000
