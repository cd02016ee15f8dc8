"""What the training loop measures without making the host wait for the device.

The host dispatches steps ahead of the device (JAX runs them asynchronously), so the loop
may look at device values only at log steps: `IntervalMetrics` keeps each step's metrics on
the device and fetches the interval's at once; `fetch` is the loop's one way to the host.
`prefetch` puts batch i+1 on the device while step i runs. `LoopClock` times the loop:
steps, the time it waited for input, and the executed FLOP/s per chip against the chip's
peak (chips.py) for MFU.
"""
from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import logging

from paraformer_jax import chips, storage


def fetch(tree):
  """Device values -> host numbers: the only place the training loop waits for the device."""
  return jax.device_get(tree)


def prefetch(batches, put, count: int, ahead: int = 2, on_host=None):
  """Yields put(batch) for `count` batches of `batches`, `ahead` of the consumer: the copy to
  the device (put is asynchronous) of the next batches runs while the current step does.
  `on_host(batch)` sees each host batch first (e.g. to count undecodable images)."""
  queue = collections.deque()
  taken = 0

  def take():
    nonlocal taken
    batch = next(batches)
    taken += 1
    if on_host is not None:
      on_host(batch)
    queue.append(put(batch))
  while taken < min(ahead, count):
    take()
  while queue:
    if taken < count:
      take()
    yield queue.popleft()


class IntervalMetrics:
  """Each step's metrics (device scalars) since the last log step, fetched together."""

  def __init__(self):
    self.pending = []  # (global step, {name: device scalar})

  def add(self, step: int, metrics):
    self.pending.append((step, metrics))

  def take(self):
    """(steps, their means {name: float}) of the interval, or (None, None) if it is empty.
    Raises FloatingPointError naming the first step with a non-finite value."""
    if not self.pending:
      return None, None
    steps, values = zip(*self.pending)
    values = fetch(list(values))
    self.pending = []
    for step, v in zip(steps, values):
      bad = {k: float(x) for k, x in v.items() if not np.isfinite(x)}
      if bad:
        raise FloatingPointError(f'non-finite training metrics {bad} at step {step} (in the '
                                 f'interval of steps {steps[0]}..{steps[-1]})')
    means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    return (steps[0], steps[-1]), means


class LoopClock:
  """Times the loop between log steps. The first call of each compiled program (lpa has
  two) compiles: the loop waits for it and restarts the clock after it, so the rates and
  `train_seconds` leave compiling out."""

  def __init__(self, start: int, devices):
    self.seen = set()
    self.done = start
    self.step_seconds, self.timed_steps = 0.0, 0
    self.devices = len(devices)
    self.chip = None if devices[0].platform == 'cpu' else chips.lookup(devices[0].device_kind)
    self.restart()

  def first_call(self, program) -> bool:
    """Whether `program`'s step has not run yet (it compiles on its first call)."""
    return program not in self.seen

  def waited_for_input(self, seconds: float):
    self.input_s += seconds

  def tick(self, done: int, program, step_flops: float):
    self.seen.add(program)
    self.done = done
    self.flops += step_flops

  def restart(self):
    """After a compile, an evaluation or a save: the next interval starts now."""
    self.interval_start, self.interval_began = self.done, time.perf_counter()
    self.input_s, self.flops = 0.0, 0.0  # input waits and executed FLOPs (all chips)

  def interval(self, batch_size: int, dtype: str) -> dict | None:
    """The figures of the steps since the last restart, once they have finished (call it
    after fetching their metrics); None if there are none. Starts the next interval."""
    steps = self.done - self.interval_start
    seconds = time.perf_counter() - self.interval_began
    input_s, executed = self.input_s, self.flops
    self.restart()
    if steps <= 0 or seconds <= 0:
      return None
    self.step_seconds += seconds
    self.timed_steps += steps
    step_s = seconds / steps
    per_chip = executed / seconds / self.devices
    out = {'step_s': step_s, 'input_wait_s': input_s / steps,
           'images_per_s': batch_size / step_s,
           'images_per_s_per_chip': batch_size / step_s / self.devices,
           'tflops_per_chip': per_chip / 1e12}
    peak = self.chip and self.chip.peak_tflops(dtype)
    if peak:
      out['mfu'] = per_chip / (peak * 1e12)
    return out

  def train_seconds(self, steps: int) -> float:
    """Seconds `steps` steps take without compiling, evaluating or saving, at the mean of
    the timed ones (docs/make_results.py compares modes by it)."""
    return self.step_seconds / max(self.timed_steps, 1) * steps

  def eta(self, steps_left: int) -> float | None:
    if not self.timed_steps:
      return None
    return steps_left * self.step_seconds / self.timed_steps


class Profile:
  """A jax.profiler trace of steps first .. first + count - 1 (`config.profile_steps`, by the
  state's step before the call), written to workdir/profile. The trace goes to local disk
  first and is copied there (the profiler writes local paths; epath copies to any store)."""

  def __init__(self, profile_steps, workdir):
    first, count = tuple(profile_steps) or (0, 0)
    self.steps = range(first, first + count)
    self.out = storage.path(workdir) / 'profile'
    self.local = None

  def before(self, step: int):
    if step - 1 == self.steps.start and self.steps:
      self.local = tempfile.mkdtemp(prefix='paraformer_profile_')
      jax.profiler.start_trace(self.local)
      logging.info('profiling steps %d..%d', self.steps[0], self.steps[-1])

  def after(self, step: int, state):
    if self.local is None or step - 1 != self.steps[-1]:
      return
    jax.block_until_ready(state)  # the trace ends once the steps have run
    jax.profiler.stop_trace()
    for folder, _, names in os.walk(self.local):
      for name in names:
        source = os.path.join(folder, name)
        target = self.out / os.path.relpath(source, self.local)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, 'rb') as f:
          target.write_bytes(f.read())
    shutil.rmtree(self.local, ignore_errors=True)
    self.local = None
    logging.info('wrote the profile of steps %d..%d to %s (open with: tensorboard --logdir=%s '
                 'or xprof)', self.steps[0], self.steps[-1], self.out, self.out)
