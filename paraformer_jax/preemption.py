"""SIGTERM and Ctrl-C: save after the current step, then stop with a resumable checkpoint.

SIGTERM (preemption, scancel, kill) and a first SIGINT (Ctrl-C) ask the training loop to
save after the step under way and stop; the program then exits with 128 + the signal number
(130 for Ctrl-C, 143 for SIGTERM), so a scheduler sees a run that did not finish. A second
Ctrl-C stops at once (KeyboardInterrupt), without saving: the last checkpoint stays.

On several processes they must stop at the same step, without a collective every step
(which would make every host wait for the slowest, each step). SIGTERM goes through JAX's
coordination service: `jax.distributed.initialize` installs its preemption notifier, which
catches SIGTERM on any process and tells the others; `reached_preemption_sync_point(step)`,
asked each step, is a local check until then, and afterwards true on every process at the
same step, the first that all can still reach. It reacts within a step or two: the 30 s a
preempted GCP VM gets are left for the save. (So on several processes no Python SIGTERM
handler is installed: it would replace the notifier's.) Ctrl-C, which the notifier does not
see, and the periodic save are agreed on at log steps (`any_process`), where the loop
synchronizes with the device anyway.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Interrupted(Exception):
  """Training stopped on a signal after saving `step`; the same command resumes it."""

  def __init__(self, signum: int, step: int, directory):
    self.signum, self.step = signum, step
    self.exit_code = 128 + signum
    super().__init__(f'interrupted by {signal.Signals(signum).name} at step {step}: saved in '
                     f'{directory}. Resume with the same command.')


class Preemption:
  """A context in which SIGTERM and Ctrl-C set `signum` instead of killing the process.

  Python runs a signal handler only between bytecodes, never inside a long call into XLA
  (initializing a large model, compiling a step: minutes). While the run is `at_rest` (no
  step since the start or the last save: nothing a save would keep) a signal stops the
  process at once instead, from a thread that `signal.set_wakeup_fd` wakes (one process;
  several stop together at a step, as above).
  """

  def __init__(self):
    self.signum = 0
    self.at_rest = False  # the trainer's: True until its first step (nothing to save yet)
    self._previous = {}
    self._wakeup = None

  def __enter__(self):
    several = jax.process_count() > 1
    for sig in (signal.SIGINT,) if several else (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook's worker): no handler
        logging.warning('SIGTERM/Ctrl-C handling is off: the trainer does not run in the '
                        'main thread.')
        break
    if self._previous and not several:
      self._watch()
    return self

  def _watch(self):
    read, write = socket.socketpair()
    write.setblocking(False)
    self._wakeup = (read, write, signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False))

    def watch():
      while True:
        try:
          data = read.recv(1)
        except OSError:
          return
        if not data:
          return
        if self.at_rest and data[0] in (signal.SIGTERM, signal.SIGINT):
          print(f'interrupted by {signal.Signals(data[0]).name} before the first training '
                f'step: stopped at once (nothing to save, nothing lost); the same command '
                f'starts again from the last checkpoint, if there is one.', file=sys.stderr,
                flush=True)
          from paraformer_jax import processes
          processes.exit_now(128 + data[0])  # stops the input workers too
    threading.Thread(target=watch, daemon=True, name='signal watch').start()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._wakeup:
      read, write, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      write.close()
      read.close()

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.signum = self.signum or signum
    more = ' (Ctrl-C again to stop at once, unsaved)' if signum == signal.SIGINT else ''
    logging.warning('%s received: saving after the current step, then exiting%s.',
                    signal.Signals(signum).name, more)

  def requested(self, step: int) -> int:
    """The signal that asks to stop after `step`, or 0; with several processes, SIGTERM to
    any of them, the same on all (a call each step, with the same steps on all processes)."""
    if jax.process_count() == 1:
      return self.signum
    if multihost_utils.reached_preemption_sync_point(step):
      return signal.SIGTERM
    return 0


def any_process(*values: int) -> list[int]:
  """Each value's maximum over the processes: a collective, so every process calls it at
  the same step (the loop's log steps)."""
  if jax.process_count() == 1:
    return [int(v) for v in values]
  gathered = multihost_utils.process_allgather(np.array(values, np.int64))
  return [int(v) for v in np.asarray(gathered).reshape(-1, len(values)).max(0)]
