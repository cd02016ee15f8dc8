"""Runs the README's example commands and regenerates the figures it quotes from them.

  .venv/bin/python docs/readme_examples.py          # rewrite the marked blocks of README.md
  .venv/bin/python docs/readme_examples.py --check  # exit 1 if a block differs (drift)

Each command below must appear in README.md verbatim (after joining continuation lines);
the script runs it with its workdirs moved under a fresh temporary directory, reads the
run's JSON reports and rewrites the README's blocks between `<!-- readme_examples: NAME -->`
and `<!-- /readme_examples -->`. Wall times are printed, not written: they vary.
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

COMMANDS = {
    'digits': 'python -m paraformer_jax.main --config=configs/digits.py '
              '--workdir=workdir/digits',
    'compress': 'python -m paraformer_jax.compress --config=configs/digits.py '
                '--workdir=workdir/digits --out=workdir/digits_small --tolerance=0.02',
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


def run_all(root: str) -> dict:
  """Runs every command (workdirs under root); returns {name: seconds}."""
  seconds = {}
  for name, cmd in COMMANDS.items():
    argv = cmd.replace('=/tmp/', f'={root}/tmp/').replace('=workdir/', f'={root}/workdir/')
    argv = argv.split()
    argv[0] = sys.executable
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='compare, do not rewrite')
  args = parser.parse_args()
  readme = open(README).read()
  if missing_commands(readme):
    sys.exit(f'README.md no longer documents: {missing_commands(readme)}; update COMMANDS.')
  with tempfile.TemporaryDirectory() as root:
    run_all(root)
    updated = rewrite(readme, blocks(root))
  if updated == readme:
    print('README.md figures are up to date.')
  elif args.check:
    sys.exit('README.md figures differ from what its commands give now: run '
             'docs/readme_examples.py to regenerate them.')
  else:
    with open(README, 'w') as f:
      f.write(updated)
    print('README.md figures regenerated.')


if __name__ == '__main__':
  main()
