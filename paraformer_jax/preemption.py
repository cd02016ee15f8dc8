"""SIGTERM and Ctrl-C: save after the current step, then stop with a resumable checkpoint.

SIGTERM (preemption, scancel, kill) and a first SIGINT (Ctrl-C) ask the training loop to
save after the step under way and stop; the program then exits with 128 + the signal number
(130 for Ctrl-C, 143 for SIGTERM), so a scheduler sees a run that did not finish. A second
Ctrl-C stops at once (KeyboardInterrupt), without saving: the last checkpoint stays.

On several processes they agree on the step to stop at: each step, a process stops if any
process was signalled.
"""
from __future__ import annotations

import signal

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
  """A context in which SIGTERM and Ctrl-C set `signum` instead of killing the process."""

  def __init__(self):
    self.signum = 0
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook's worker): no handler
        logging.warning('SIGTERM/Ctrl-C handling is off: the trainer does not run in the '
                        'main thread.')
        break
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.signum = self.signum or signum
    more = ' (Ctrl-C again to stop at once, unsaved)' if signum == signal.SIGINT else ''
    logging.warning('%s received: saving after the current step, then exiting%s.',
                    signal.Signals(signum).name, more)

  def requested(self) -> int:
    """The signal that asked to stop (on any process), or 0."""
    if jax.process_count() == 1:
      return self.signum
    return int(multihost_utils.process_allgather(np.array(self.signum)).max())
