"""What a run reports: progress lines, JSON-lines and TensorBoard metrics, prefix tables, plots."""
from __future__ import annotations

import json
import os

import jax
import matplotlib

matplotlib.use('Agg')  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


class MetricWriter:
  """metrics.jsonl and TensorBoard event files in the workdir, written by process 0 only."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if self._active:
      from tensorboardX import SummaryWriter  # TensorBoard events without TensorFlow
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self._active:
      return
    self._jsonl.write(json.dumps({'step': int(step), **metrics}) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self):
    if self._active:
      self._jsonl.close()
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


def progress_line(stage: str, step: int, total: int, metrics: dict, images_per_s: float,
                  eta_s: float) -> str:
  return (f'{stage}step {step}/{total} loss {metrics["loss"]:.4f} '
          f'acc {metrics["accuracy"]:.3f} {images_per_s:.1f} img/s ETA {format_duration(eta_s)}')


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
           f'{"data":>5} {"classes":>8} {"examples":>8} {"before":>8} {"after":>8} '
           f'{"change":>8}']
  lines += [f'{r["data"]:>5} {r["classes"]:>8} {r["examples"]:>8} {100 * r["before"]:>7.2f}% '
            f'{100 * r["after"]:>7.2f}% {100 * r["change"]:>+7.2f}%' for r in rows]
  return '\n'.join(lines)


def plot_prefix(rows, path: str, title: str):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ks = [r['branches'] for r in rows]
  ax.plot(ks, [100 * r['accuracy'] for r in rows], marker='o')
  ax.set_xlabel('branches used (first k)')
  ax.set_ylabel('accuracy (%)')
  ax.set_xticks(ks)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  twin = ax.twinx()
  twin.plot(ks, [r['params'] / 1e6 for r in rows], color='gray', ls='--', marker='.')
  twin.set_ylabel('parameters (M)', color='gray')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
