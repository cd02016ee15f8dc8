"""What a run reports: progress lines, JSON-lines and TensorBoard metrics, prefix tables, plots."""
from __future__ import annotations

import io
import json
import os
import time

import jax
import matplotlib
from tensorboardX import record_writer

from paraformer_jax import storage

matplotlib.use('Agg')  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


class _ObjectStoreEventFile:
  """A TensorBoard event file on an object store, which cannot append: kept in memory and
  uploaded whole at each flush (as tensorboardX's own GCS writer does, but through epath,
  so any scheme and the storage emulator work)."""

  def __init__(self, path):
    self._path, self._buffer = path, io.BytesIO()

  def write(self, data):
    self._buffer.write(data)

  def flush(self):
    storage.write_atomic(self._path, self._buffer.getvalue())

  def close(self):
    self.flush()


class _ObjectStoreEventFiles:
  def open(self, path):
    return _ObjectStoreEventFile(path)

  def directory_check(self, path):
    del path  # object stores have no directories to make


record_writer.register_writer_factory('gs', _ObjectStoreEventFiles())


class MetricWriter:
  """metrics.jsonl and TensorBoard event files in the workdir, written by process 0 only.

  Locally metrics.jsonl is appended to at every write. An object store cannot append: there
  the lines are kept in memory (those of earlier runs in the same workdir read back first)
  and the file is rewritten whole at most every `REMOTE_FLUSH_S` seconds, and at close.
  """
  REMOTE_FLUSH_S = 30.0

  def __init__(self, workdir):
    self._active = jax.process_index() == 0
    if self._active:
      from tensorboardX import SummaryWriter  # TensorBoard events without TensorFlow
      workdir = storage.path(workdir)
      self._path = workdir / 'metrics.jsonl'
      self._remote = storage.is_remote(workdir)
      self._lines = (self._path.read_text().splitlines()
                     if self._remote and self._path.exists() else [])
      self._unwritten = []  # local: lines not yet appended
      self._every = self.REMOTE_FLUSH_S if self._remote else 0.0
      self._flushed = time.monotonic()
      self._tb = SummaryWriter(os.fspath(workdir / 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self._active:
      return
    (self._lines if self._remote else self._unwritten).append(
        json.dumps({'step': int(step), **metrics}))
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, int(step))
    if time.monotonic() - self._flushed >= self._every:
      self.flush()

  def flush(self):
    if not self._active:
      return
    if self._remote:
      storage.write_atomic(self._path, ''.join(line + '\n' for line in self._lines))
    else:
      with self._path.open('a') as f:
        f.write(''.join(line + '\n' for line in self._unwritten))
      self._unwritten = []
    self._tb.flush()
    self._flushed = time.monotonic()

  def close(self):
    if self._active:
      self.flush()
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


def progress_line(stage: str, step: int, total: int, metrics: dict, timing, eta_s) -> str:
  """`step` of `total` counted over the whole run (all stages), the interval's mean metrics,
  and its timing (telemetry.LoopClock.interval; None when its only step compiled)."""
  line = (f'{stage}step {step}/{total} loss {metrics["loss"]:.4f} '
          f'acc {metrics["accuracy"]:.3f}')
  if timing is None:  # only the compiling step ran: its time is the compile's, not a rate
    return f'{line} (its one step compiled: no rate)'
  mfu = f' MFU {100 * timing["mfu"]:.1f}%' if 'mfu' in timing else ''
  eta = f' ETA {format_duration(eta_s)}' if eta_s is not None else ''
  return (f'{line} {timing["images_per_s"]:.1f} img/s ({timing["images_per_s_per_chip"]:.1f} '
          f'per chip) step {1e3 * timing["step_s"]:.1f} ms (input wait '
          f'{1e3 * timing["input_wait_s"]:.1f} ms) {timing["tflops_per_chip"]:.3g} TFLOP/s per '
          f'chip{mfu}{eta}')


def prefix_rows(accuracies, param_counts):
  return [{'branches': k + 1, 'params': int(n), 'accuracy': float(a)}
          for k, (a, n) in enumerate(zip(accuracies, param_counts))]


def prefix_table(rows, title: str) -> str:
  lines = [title, f'{"branches":>8} {"params":>12} {"accuracy":>9}']
  lines += [f'{r["branches"]:>8} {r["params"]:>12,} {100 * r["accuracy"]:>8.2f}%' for r in rows]
  return '\n'.join(lines)


def forgetting_table(rows, old_branches: int, new_branches: int) -> str:
  lines = [f'Expansion: test accuracy before ({old_branches} branches) and after '
           f'({new_branches} branches, the first {old_branches} frozen)',
           f'{"data":>5} {"classes":>10} {"examples":>8} {"before":>8} {"after":>8} '
           f'{"change":>8}']
  lines += [f'{r["data"]:>5} {r["classes"]:>10} {r["examples"]:>8} {100 * r["before"]:>7.2f}% '
            f'{100 * r["after"]:>7.2f}% {100 * r["change"]:>+7.2f}%' for r in rows]
  return '\n'.join(lines)


def plot_prefix(rows, path: str, title: str, num_classes: int, frozen: int = 0):
  fig = prefix_figure(rows, title, num_classes, frozen)
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=120)
  plt.close(fig)
  storage.write_atomic(path, png.getvalue())


def prefix_figure(rows, title: str, num_classes: int, frozen: int = 0):
  """Accuracy of the first k branches on a fixed 0-100% axis (chance level at 10% must not
  look like a trend), with chance, the parameter count, and (expansion) where the old run's
  frozen branches end."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ks = [r['branches'] for r in rows]
  lines = ax.plot(ks, [100 * r['accuracy'] for r in rows], marker='o', label='test accuracy')
  lines += [ax.axhline(100 / num_classes, color='black', ls=':', lw=1,
                       label=f'chance ({100 / num_classes:.1f}%)')]
  if frozen:
    lines += [ax.axvline(frozen + 0.5, color='tab:red', ls='-.', lw=1,
                         label=f'old run: branches 1-{frozen} (frozen)')]
  ax.set_ylim(0, 100)
  ax.set_xlabel('branches used (first k)')
  ax.set_ylabel('accuracy (%)')
  ax.set_xticks(ks)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  twin = ax.twinx()
  lines += twin.plot(ks, [r['params'] / 1e6 for r in rows], color='gray', ls='--', marker='.',
                     label='parameters (M, right axis)')
  twin.set_ylim(0, None)
  twin.set_ylabel('parameters (M)', color='gray')
  ax.legend(lines, [l.get_label() for l in lines], loc='lower right', fontsize=8)
  fig.tight_layout()
  return fig
