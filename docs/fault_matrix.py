"""Provokes every fault in every training mode from the command line; writes docs/faults.md's
matrix.

  .venv/bin/python docs/fault_matrix.py            # rewrite the matrix in docs/faults.md
  .venv/bin/python docs/fault_matrix.py --print    # print it only

Each mode trains configs/tiny.py (4 epochs of 13 steps, validated and saved every 5 steps)
with `python -m paraformer_jax.main`, as a user would; each fault is one or two more runs of
the same command in a fresh workdir, and its cell says what happened: the exit status, the
last line on stderr where it says more, and whether the run that resumed ended with the
uninterrupted run's final table. A cell that shows something other than the documented
outcome says so (FAILED) and the script exits 1. The lost-process column comes from the
multi-process tests (tests/multiprocess_test.py), which need several processes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS_MD = os.path.join(REPO, 'docs', 'faults.md')
BASE = ['--config=configs/tiny.py', '--config.training.epochs=4', '--config.eval_every_steps=5',
        '--config.log_every_steps=5', '--config.keep_checkpoints=3']
MODES = {
    'joint': ['--config.training.mode=joint'],
    'lpa': ['--config.training.mode=lpa'],
    'lpa_fused': [],
    'stagewise': ['--config.training.mode=stagewise', '--config.training.branches_per_stage=2'],
    'expansion': ['--config.data.classes=5-9', '--config.model.num_branches=2',
                  '--config.expand_from={root}/source'],
    'fine-tune': ['--config.init_from={root}/source'],  # 10 classes: a fresh head
}
SOURCE = ['--config.data.classes=0-4', '--config.data.num_classes=5']  # the last two's start
FAULTS = ('SIGTERM at start-up', 'SIGINT mid-run', 'kill -9 mid-run', 'damaged checkpoint',
          'NaN loss', 'full disk')
LOST_PROCESS = ('stagewise: `multiprocess_test.py::test_a_killed_process_stops_the_other_at_'
                'once_naming_it` (exit 75, resumed to the 1-process result)')


def run(args, workdir, env, until=None, then=None, limit_fsize=None):
  """Runs the trainer; `until`: a regex over stderr lines at which `then(proc)` is called.
  Returns (exit status, stderr lines)."""
  cmd = [sys.executable, '-m', 'paraformer_jax.main', f'--workdir={workdir}', *args]

  def limit():
    if limit_fsize:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, resource.RLIM_INFINITY))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, preexec_fn=limit)
  lines = []
  for line in proc.stderr:
    lines.append(line.rstrip('\n'))
    if until and re.search(until, line):
      then(proc)
      until = None
  return proc.wait(timeout=600), lines


def last_error(lines) -> str:
  ours = [l for l in lines if l.startswith(('error:', 'interrupted')) or 'Moved it to' in l]
  return ours[-1] if ours else (lines[-1] if lines else '')


def final(workdir):
  path = os.path.join(workdir, 'final_prefix_accuracy.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)['prefixes']


def largest_file(directory):
  files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


def cell(ok: bool, text: str) -> str:
  return ('' if ok else '**FAILED**: ') + text.replace('|', '\\|')


def fault_cells(args, root, env, want):
  """{fault: cell} for one mode whose uninterrupted final table is `want`."""
  cells = {}
  w = lambda name: os.path.join(root, name)

  code, lines = run(args, w('startup'), env, r'compiling the training step',
                    lambda p: p.send_signal(signal.SIGTERM))
  early = 'before the first training step' in last_error(lines)
  cells[FAULTS[0]] = cell(code == 143, f'exit {code}; ' + (
      'stopped at once, nothing saved' if early else
      'the step had run: saved it (the compile was shorter than the signal\'s way)'))

  code, lines = run(args, w('sigint'), env, r'step 10/', lambda p: p.send_signal(signal.SIGINT))
  saved = re.search(r'at step (\d+): saved', last_error(lines))
  again, _ = run(args, w('sigint'), env)
  same = final(w('sigint')) == want
  cells[FAULTS[1]] = cell(code == 130 and saved and again == 0 and same,
                          f'exit {code}, saved step {saved and saved.group(1)}; the same '
                          f'command resumed (exit {again}), final table '
                          f'{"equal to" if same else "NOT equal to"} the uninterrupted run\'s')

  # At step 20's validation: step 10's save is complete (Orbax finishes one before the next).
  code, lines = run(args, w('kill9'), env, r'step 20 validation', lambda p: p.kill())
  again, lines = run(args, w('kill9'), env)
  resumed = re.search(r'Resuming from step (\d+)', '\n'.join(lines))
  same = final(w('kill9')) == want
  cells[FAULTS[2]] = cell(code == -9 and again == 0 and same and resumed,
                          f'killed at step 20\'s validation; the same command resumed from step '
                          f'{resumed and resumed.group(1)} (exit {again}), final table '
                          f'{"equal to" if same else "NOT equal to"} the uninterrupted run\'s')

  shutil.copytree(w('straight'), w('damaged'))
  checkpoints = os.path.join(w('damaged'), 'checkpoints')
  latest = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  with open(largest_file(os.path.join(checkpoints, str(latest))), 'r+b') as f:
    f.truncate(100)
  os.remove(os.path.join(w('damaged'), 'final_prefix_accuracy.json'))
  code, lines = run(args + ['--mode=eval'], w('damaged'), env)
  eval_code = code
  code, lines = run(args, w('damaged'), env)
  moved = any('Moved it to' in l for l in lines)
  same = final(w('damaged')) == want
  cells[FAULTS[3]] = cell(eval_code == 2 and code == 0 and moved and same,
                          f'eval: exit {eval_code}; training moved step {latest} to '
                          f'damaged-{latest}, resumed from the one before (exit {code}), final '
                          f'table {"equal to" if same else "NOT equal to"} the uninterrupted '
                          f'run\'s')

  code, lines = run(args + ['--config.training.learning_rate=1e6'], w('nan'), env)
  cells[FAULTS[4]] = cell(code == 3 and 'Training diverged' in last_error(lines),
                          f'exit {code}: "{last_error(lines)[7:95]}..."')

  # No compilation cache here: its entries are large files too.
  code, lines = run(args, w('full'), {k: v for k, v in env.items()
                                      if k != 'JAX_COMPILATION_CACHE_DIR'},
                    limit_fsize=64 * 1024)
  left = [n for n in os.listdir(os.path.join(w('full'), 'checkpoints'))]
  message = [l for l in lines if l.startswith('error: Writing a checkpoint')]
  cells[FAULTS[5]] = cell(code == 2 and message and not any('tmp' in n for n in left) and
                          not any('Traceback' in l for l in lines),
                          f'exit {code}, {len(lines)} lines on stderr, no traceback; the '
                          f'half-written checkpoint removed (checkpoints/ holds {left})')
  return cells


def matrix(root, modes) -> tuple[str, bool]:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(root, 'compiles'))
  env.pop('XLA_FLAGS', None)
  code, lines = run(BASE + SOURCE, os.path.join(root, 'source'), env)
  if code:
    sys.exit('the source run failed:\n' + '\n'.join(lines[-20:]))
  rows, ok = [], True
  for mode in modes:
    extra = MODES[mode]
    start = time.perf_counter()
    args = BASE + [a.format(root=root) for a in extra]
    mode_root = os.path.join(root, mode)
    os.makedirs(mode_root)
    code, lines = run(args, os.path.join(mode_root, 'straight'), env)
    if code:
      sys.exit(f'{mode}: the uninterrupted run failed:\n' + '\n'.join(lines[-20:]))
    cells = fault_cells(args, mode_root, env, final(os.path.join(mode_root, 'straight')))
    ok &= not any('FAILED' in c for c in cells.values())
    rows.append(f'| {mode} | ' + ' | '.join(cells[f] for f in FAULTS) + ' | ' + (
        LOST_PROCESS if mode == 'stagewise' else 'not tried') + ' |')
    print(f'{mode}: {time.perf_counter() - start:.0f} s', flush=True)
  head = ('| mode | ' + ' | '.join(FAULTS) + ' | lost process |\n|' + '---|' * (len(FAULTS) + 2))
  return head + '\n' + '\n'.join(rows), ok


BLOCK = re.compile(r'(<!-- fault_matrix -->\n)(.*?)(<!-- /fault_matrix -->)', re.S)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--print', action='store_true', help='print the matrix, do not write it')
  parser.add_argument('--modes', nargs='+', default=list(MODES), choices=list(MODES),
                      help='only these rows (printed, not written)')
  args = parser.parse_args()
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as root:
    table, ok = matrix(root, args.modes)
  stamp = (f'Generated by `python docs/fault_matrix.py` on {time.strftime("%Y-%m-%d")} at '
           f'commit {commit}, one CPU device.')
  text = stamp + '\n\n' + table + '\n'
  print(text)
  if not args.print and set(args.modes) == set(MODES):
    with open(FAULTS_MD) as f:
      doc = f.read()
    with open(FAULTS_MD, 'w') as f:
      f.write(BLOCK.sub(lambda m: m.group(1) + text + m.group(3), doc))
    print(f'wrote the matrix into {FAULTS_MD}')
  if not ok:
    sys.exit('some cells show an outcome other than the documented one (FAILED)')


if __name__ == '__main__':
  main()
