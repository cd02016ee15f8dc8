"""Runs the README's example commands and regenerates the figures it quotes from them.

  .venv/bin/python docs/readme_examples.py          # rewrite the marked blocks of README.md
  .venv/bin/python docs/readme_examples.py --check  # exit 1 if a figure is off by more than
                                                    # TOLERANCE (or another word differs)
  .venv/bin/python docs/readme_examples.py --print --devices=8 --seed=1   # the spread

Each command below must appear in README.md verbatim (after joining continuation lines);
the script runs it with its workdirs moved under a fresh temporary directory, reads the
run's JSON reports and rewrites the README's blocks between `<!-- readme_examples: NAME -->`
and `<!-- /readme_examples -->`. Wall times are printed, not written: they vary.

XLA's float rounding differs by machine and by device count, and a training run carries a
difference of one rounding forward, so the figures cannot match everywhere: `--check` allows
every accuracy TOLERANCE percentage points, and every other number of a block (steps, the
branches kept, parameter counts, ratios) TOLERANCE_RELATIVE of itself. README.md states both,
with the spread they come from.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')

# Accuracy points and relative change the figures may move by on another machine or device
# count (README.md: "How far the figures reproduce").
TOLERANCE = 3.0
TOLERANCE_RELATIVE = 0.2
TRAINING = ('digits', 'old', 'expanded', 'replayed')  # the commands that take a seed

COMMANDS = {
    'digits': 'python -m paraformer_jax.main --config=configs/digits.py '
              '--workdir=workdir/digits',
    'compress': 'python -m paraformer_jax.compress --config=configs/digits.py '
                '--workdir=workdir/digits --out=workdir/digits_small --k=4',
    'compressed_eval': 'python -m paraformer_jax.main --config=workdir/digits_small/config.py '
                       '--workdir=workdir/digits_small --mode=eval',
    'old': 'python -m paraformer_jax.main --config=configs/digits_0to4.py '
           '--workdir=/tmp/pf_digits_0to4',
    'expanded': 'python -m paraformer_jax.main --config=configs/digits_5to9.py '
                '--workdir=/tmp/pf_digits_5to9 --config.expand_from=/tmp/pf_digits_0to4',
    'replayed': 'python -m paraformer_jax.main --config=configs/digits_5to9.py '
                '--workdir=/tmp/pf_digits_5to9r --config.expand_from=/tmp/pf_digits_0to4 '
                '--config.replay_per_class=20 --config.align_head=True',
}


def documented(readme: str) -> str:
  """README text with shell continuation lines joined, for verbatim matching."""
  return re.sub(r'\\\n\s*', '', readme)


def missing_commands(readme: str) -> list[str]:
  text = documented(readme)
  return [name for name, cmd in COMMANDS.items() if cmd not in text]


def run_all(root: str, seed: int | None = None, devices: int | None = None) -> dict:
  """Runs every command (workdirs under root); returns {name: seconds}.

  seed: --config.seed for the training commands (None: the config's); devices: that many
  CPU devices (XLA_FLAGS) for every command (None: the environment's)."""
  env = dict(os.environ)
  if devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  seconds = {}
  for name, cmd in COMMANDS.items():
    argv = cmd.replace('=/tmp/', f'={root}/tmp/').replace('=workdir/', f'={root}/workdir/')
    argv = argv.split()
    argv[0] = sys.executable
    if seed is not None and name in TRAINING:
      argv.append(f'--config.seed={seed}')
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode:
      sys.exit(f'{name} failed:\n{out.stderr[-3000:]}')
    seconds[name] = time.perf_counter() - start
    print(f'{name}: {seconds[name]:.0f} s', flush=True)
  return seconds


def _json(path):
  with open(path) as f:
    return json.load(f)


def pct(x: float) -> str:
  return f'{100 * x:.2f}%'


def blocks(root: str) -> dict:
  """{block name: its text}, from the runs' reports."""
  w = lambda *p: os.path.join(root, *p)
  final = _json(w('workdir', 'digits', 'final_prefix_accuracy.json'))
  table = [f'final (step {final["step"]}): sklearn_digits test, {final["count"]} examples, '
           'accuracy of the first k branches', f'{"branches":>8} {"params":>12} {"accuracy":>9}']
  table += [f'{r["branches"]:>8} {r["params"]:>12,} {100 * r["accuracy"]:>8.2f}%'
            for r in final['prefixes']]
  report = _json(w('workdir', 'digits_small', 'compression.json'))
  rows, k = report['rows'], report['k']
  evaluated = _json(w('workdir', 'digits_small',
                      f'eval_step{report["step"]}_prefix_accuracy.json'))
  kept = rows[k - 1]
  compress = (
      f'  the run above (best checkpoint: step {report["step"]}, '
      f'{pct(rows[-1]["val_accuracy"])} validation, {pct(rows[-1]["test_accuracy"])} test) '
      f'it kept {k} branches: {pct(kept["val_accuracy"])} validation, '
      f'{pct(kept["test_accuracy"])} test, {kept["compression"]:.2f}x fewer parameters; its '
      f'workdir evaluates to {pct(evaluated["prefixes"][-1]["accuracy"])}.')
  old = _json(w('tmp', 'pf_digits_0to4', 'final_prefix_accuracy.json'))
  lines = [f'  The 8 branches trained on 0-4 reach {pct(old["prefixes"][-1]["accuracy"])} on '
           f'the {old["count"]} test images of 0-4. Then, test accuracy of the 12-branch model '
           '(`forgetting.json`, "after"):', '',
           '  | expansion | old digits 0-4 | new digits 5-9 | all 360 test digits |',
           '  |---|---|---|---|']
  for label, run in (('no replay', 'pf_digits_5to9'),
                     ('replay 20 per old class + alignment', 'pf_digits_5to9r')):
    after = {r['data']: r['after'] for r in _json(w('tmp', run, 'forgetting.json'))}
    lines.append(f'  | {label} | {pct(after["old"])} | {pct(after["new"])} | '
                 f'{pct(after["all"])} |')
  return {'digits': '```\n' + '\n'.join(table) + '\n```', 'compress': compress,
          'expansion': '\n'.join(lines)}


BLOCK = re.compile(r'(<!-- readme_examples: (\w+) -->\n)(.*?)(\n *<!-- /readme_examples -->)',
                   re.S)


def rewrite(readme: str, new: dict) -> str:
  return BLOCK.sub(lambda m: m.group(1) + new[m.group(2)] + m.group(4), readme)


NUMBER = re.compile(r'\d[\d,]*(?:\.\d+)?%?')


def differences(documented_block: str, new_block: str) -> list[str]:
  """What differs beyond the tolerances between a README block and a fresh one: an accuracy
  (a number with %) by more than TOLERANCE points, another number by more than
  TOLERANCE_RELATIVE of the README's, or any word."""
  old, new = NUMBER.findall(documented_block), NUMBER.findall(new_block)
  if NUMBER.sub('#', documented_block).split() != NUMBER.sub('#', new_block).split():
    return ['the text around the figures differs']
  found = []
  for a, b in zip(old, new):
    x, y = float(a.rstrip('%').replace(',', '')), float(b.rstrip('%').replace(',', ''))
    if a.endswith('%') != b.endswith('%'):
      found.append(f'{a} became {b}')
    elif a.endswith('%') and abs(x - y) > TOLERANCE:
      found.append(f'{a} became {b} (more than {TOLERANCE:g} points)')
    elif not a.endswith('%') and abs(x - y) > TOLERANCE_RELATIVE * abs(x):
      found.append(f'{a} became {b} (more than {100 * TOLERANCE_RELATIVE:g}%)')
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='compare within the tolerances, '
                      'do not rewrite')
  parser.add_argument('--print', action='store_true', help='print the blocks, do not rewrite')
  parser.add_argument('--seed', type=int, help='--config.seed for the training commands')
  parser.add_argument('--devices', type=int, help='CPU devices for the commands (XLA_FLAGS)')
  args = parser.parse_args()
  readme = open(README).read()
  if missing_commands(readme):
    sys.exit(f'README.md no longer documents: {missing_commands(readme)}; update COMMANDS.')
  with tempfile.TemporaryDirectory() as root:
    run_all(root, args.seed, args.devices)
    new = blocks(root)
  updated = rewrite(readme, new)
  if args.print:
    print('\n\n'.join(f'{name}:\n{text}' for name, text in new.items()))
  elif args.check:
    found = [f'{m.group(2)}: {d}' for m in BLOCK.finditer(readme)
             for d in differences(m.group(3), new[m.group(2)])]
    if found:
      sys.exit('README.md figures are off by more than the stated tolerance: '
               + '; '.join(found) + '. Run docs/readme_examples.py to regenerate them.')
    print('README.md figures agree within the tolerance '
          f'({TOLERANCE:g} points, {100 * TOLERANCE_RELATIVE:g}% for other numbers).')
  elif updated == readme:
    print('README.md figures are up to date.')
  else:
    with open(README, 'w') as f:
      f.write(updated)
    print('README.md figures regenerated.')


if __name__ == '__main__':
  main()
