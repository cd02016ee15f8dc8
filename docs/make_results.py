"""Regenerates docs/results.md: ParaFormer's claims checked on scikit-learn's digits.

  .venv/bin/python docs/make_results.py --seeds=5

Every run trains configs/digits.py (or the continual-learning pair digits_0to4 / digits_5to9)
with one seed and a few overrides, in its own workdir under --out. A run whose workdir
already holds its final report is read, not trained again, so an interrupted regeneration
picks up where it stopped, and --parts regenerates some tables without the others.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import matplotlib
import scipy.stats

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from absl import logging  # noqa: E402

from configs import digits, digits_0to4, digits_5to9  # noqa: E402

from paraformer_jax import input_pipeline, train  # noqa: E402
from paraformer_jax.model import merge_frozen  # noqa: E402

BRANCHES = (1, 2, 4, 8)
MODES = ('joint', 'lpa', 'lpa_fused', 'stagewise')
MODE_EPOCHS = 8  # stagewise: one epoch per branch, so every mode sees 8 epochs of data
PARTS = ('scaling', 'expansion', 'modes', 'parallel')


def run(out, name, seed, make_config, **overrides):
  """Trains (unless done before) and returns the run's final report plus its wall time."""
  workdir = os.path.join(out, f'{name}_seed{seed}')
  report = os.path.join(workdir, 'final_prefix_accuracy.json')
  timing = os.path.join(workdir, 'wall_seconds.json')
  if not os.path.exists(timing):
    config = make_config()
    config.seed = seed
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split('.')
      for part in path:
        node = node[part]
      node[leaf] = value
    print(f'training {name} seed {seed}', flush=True)
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    with open(timing, 'w') as f:
      json.dump(time.perf_counter() - start, f)
  result = json.load(open(report))
  result['seconds'] = json.load(open(timing))
  forgetting = os.path.join(workdir, 'forgetting.json')
  if os.path.exists(forgetting):
    result['forgetting'] = json.load(open(forgetting))
  result['workdir'] = workdir
  return result


def mean_std(values):
  values = [100 * v for v in values]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return statistics.mean(values), spread


def cell(values):
  m, s = mean_std(values)
  return f'{m:.2f} ± {s:.2f}'


def cell_ci(values):
  """mean ± std [95% t-interval of the mean], of fractions, in %."""
  m, s = mean_std(values)
  if len(values) < 2:
    return f'{m:.2f}'
  half = scipy.stats.t.ppf(0.975, len(values) - 1) * s / len(values) ** 0.5
  return f'{m:.2f} ± {s:.2f} [{m - half:.2f}, {m + half:.2f}]'


def full_accuracy(result):
  return result['prefixes'][-1]['accuracy']


def scaling(args, seeds):
  """Accuracy against the number of branches (M=1), and sequential baselines of equal size."""
  trained = lambda name, **kw: [run(args.out, name, s, digits.get_config,
                                    **{**kw, **args.epochs_override}) for s in seeds]
  runs = {L: trained(f'paraformer_{L}x1', **{'model.num_branches': L}) for L in BRANCHES}
  # 1 branch of L blocks: the same parameter count as L branches of 1 block.
  seq = {L: trained(f'sequential_1x{L}', **{'model.num_branches': 1, 'model.branch_depth': L})
         for L in BRANCHES}
  acc = lambda results: mean_std([full_accuracy(r) for r in results])
  params = lambda results: results[0]['prefixes'][-1]['params']
  lines = ['## Accuracy against the number of branches, and the sequential baseline', '',
           f'`configs/digits.py` (`lpa_fused`, '
           f'{args.epochs_override.get("training.epochs", digits.get_config().training.epochs)} '
           f'epochs, 8x8 images), {len(seeds)} seeds; test accuracy (%) of the full model, '
           'mean ± standard deviation over seeds. ParaFormer Lx1 (L branches of 1 block) and '
           'the sequential 1xL (1 branch of L blocks) have the same parameters.', '',
           '| L | parameters | ParaFormer Lx1 | sequential 1xL |', '|---|---|---|---|']
  for L in BRANCHES:
    lines.append(f'| {L} | {params(runs[L]):,} | {cell([full_accuracy(r) for r in runs[L]])} '
                 f'| {cell([full_accuracy(r) for r in seq[L]])} |')
  means = [acc(runs[L])[0] for L in BRANCHES]
  rises = all(a < b for a, b in zip(means, means[1:]))
  gap = {L: (acc(runs[L])[0] - acc(seq[L])[0], acc(runs[L])[1] + acc(seq[L])[1])
         for L in BRANCHES[1:]}  # L = 1 is the same model twice
  listed = lambda keep: ', '.join(str(L) for L, (d, s) in gap.items() if keep(d, s)) or 'none'
  lines += ['', f'- Does accuracy rise with branches? Means for L = 1, 2, 4, 8: '
                f'{", ".join(f"{m:.2f}" for m in means)}: '
                f'{"yes, at every step" if rises else "not at every step"}.',
            f'- ParaFormer against the sequential model of the same size (a gap counts when it '
            f'exceeds the two standard deviations added together): ahead at L = '
            f'{listed(lambda d, s: d > s)}; behind at L = {listed(lambda d, s: -d > s)}; '
            f'within the spread at L = {listed(lambda d, s: abs(d) <= s)}.', '']

  # Compression: every prefix k of the 8x1 runs, from the same single pass.
  per_k = [[r['prefixes'][k]['accuracy'] for r in runs[8]] for k in range(8)]
  full_params = params(runs[8])
  lines += ['## Compression: the first k branches of the 8x1 model', '',
            'The same 8x1 runs, evaluated with their first k branches only (no retraining). '
            'Last column: the smallest sequential model above whose mean accuracy is at least '
            'that of the k branches, and how many times more parameters it has.', '',
            '| k | parameters | ratio to 8 | test accuracy | sequential of equal accuracy |',
            '|---|---|---|---|---|']
  for k, accs in enumerate(per_k):
    k_params = runs[8][0]['prefixes'][k]['params']
    match = next((L for L in BRANCHES if acc(seq[L])[0] >= mean_std(accs)[0]), None)
    versus = ('none of 1x1-1x8 reaches it' if match is None else
              f'1x{match}: {params(seq[match]) / k_params:.2f}x')
    lines.append(f'| {k + 1} | {k_params:,} | {full_params / k_params:.2f}x | {cell(accs)} '
                 f'| {versus} |')
  full = mean_std(per_k[-1])[0]
  smallest = next(k for k in range(8) if mean_std(per_k[k])[0] >= full - 1.0) + 1
  lines += ['', f'Smallest k within 1 point of the full model (mean): k = {smallest}, '
                f'{full_params / runs[8][0]["prefixes"][smallest - 1]["params"]:.2f}x fewer '
                f'parameters. The paper reports up to 15.07x on its datasets; here the first '
                f'branch alone ({full_params / runs[8][0]["prefixes"][0]["params"]:.2f}x fewer '
                f'parameters) is {full - mean_std(per_k[0])[0]:.1f} '
                f'points below the full model.', '']
  plot_scaling(args, runs, seq, per_k)
  return lines


def plot_scaling(args, runs, seq, per_k):
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, group in (('ParaFormer Lx1', runs), ('sequential 1xL', seq)):
    ms = [mean_std([full_accuracy(r) for r in group[L]]) for L in BRANCHES]
    axes[0].errorbar(BRANCHES, [m for m, _ in ms], [s for _, s in ms], marker='o', capsize=3,
                     label=label)
  axes[0].set(xlabel='L (branches, or blocks of the sequential model)',
              ylabel='test accuracy (%)', xticks=BRANCHES, title='Accuracy against size')
  axes[0].legend()
  ks = range(1, 9)
  kms = [mean_std(a) for a in per_k]
  axes[1].errorbar(ks, [m for m, _ in kms], [s for _, s in kms], marker='o', capsize=3)
  axes[1].set(xlabel='first k branches of 8x1', ylabel='test accuracy (%)', xticks=list(ks),
              title='Compression (anytime outputs)')
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(args.docs, 'results_scaling.png'), dpi=120)
  plt.close(fig)


def modes(args, seeds):
  epochs = args.epochs_override.get('training.epochs', MODE_EPOCHS)
  runs = {}
  for mode in MODES:
    stage = {'training.epochs': max(epochs // 8, 1),
             'training.branches_per_stage': 1} if mode == 'stagewise' else {}
    runs[mode] = [run(args.out, f'mode_{mode}_{epochs}ep', s, digits.get_config,
                      **{'training.mode': mode, 'training.epochs': epochs, **stage})
                  for s in seeds]
  lines = ['## Training modes at equal epochs', '',
           f'ParaFormer 8x1 on digits, {epochs} epochs of data for every mode (`stagewise`: '
           f'{max(epochs // 8, 1)} per branch, one branch per stage; `lpa`: each epoch is an '
           f'LPA pass and a full pass, as in the authors\' schedule), {len(seeds)} seeds. Wall '
           'time includes compilation and evaluation.', '',
           '| mode | test accuracy | wall time (s) |', '|---|---|---|']
  for mode, results in runs.items():
    lines.append(f'| {mode} | {cell([full_accuracy(r) for r in results])} | '
                 f'{statistics.mean(r["seconds"] for r in results):.0f} |')
  lines += ['', 'Equal epochs are not equal work: for each minibatch, `lpa` makes 8 prefix updates in '
            'its LPA pass and 1 more in its full pass (9 optimizer updates and two passes over '
            'the data, against 1 update for `joint` and `lpa_fused`), so compare '
            'it with the others by wall time as well. `stagewise` trains each branch for one '
            'epoch only, and its wall time is mostly the compilation of 8 stages.', '']
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ms = [mean_std([full_accuracy(r) for r in runs[m]]) for m in MODES]
  ax.bar(MODES, [m for m, _ in ms], yerr=[s for _, s in ms], capsize=3)
  for i, m in enumerate(MODES):
    ax.text(i, 2, f'{statistics.mean(r["seconds"] for r in runs[m]):.0f} s', ha='center',
            color='white')
  ax.set(ylabel='test accuracy (%)', title=f'Training modes, {epochs} epochs')
  fig.tight_layout()
  fig.savefig(os.path.join(args.docs, 'results_modes.png'), dpi=120)
  plt.close(fig)
  return lines


REPLAY_PER_CLASS = 20  # of ~125 training images per digit class
CONTINUAL = {  # variant: overrides of configs/digits_5to9.py
    'no replay': {},
    'replay': {'replay_per_class': REPLAY_PER_CLASS},
    'replay + alignment': {'replay_per_class': REPLAY_PER_CLASS, 'align_head': True},
}


def class_accuracy(result, classes: str) -> float:
  """Test accuracy of a finished run's final model on the test images of `classes`."""
  config = ml_collections.ConfigDict(json.load(open(os.path.join(result['workdir'],
                                                                 'config.json'))))
  trainer = train.Trainer(config, result['workdir'], create=False)
  state, stage = trainer.restore(trainer.ckpts.latest_step())
  model, params = merge_frozen(trainer.plan.model(stage), state.params)
  test = input_pipeline.split_source(config.data, config.data.test_split, classes=classes)
  return trainer.evaluate(model, params, test)['prefix_accuracy'][-1]


def expansion(args, seeds):
  """Old / new / all-class test accuracy of each continual variant, and the upper bound."""
  table = {name: {'old': [], 'new': [], 'all': []} for name in [*CONTINUAL, 'joint on 0-9']}
  for s in seeds:
    old = run(args.out, 'digits_0to4', s, digits_0to4.get_config, **args.epochs_override)
    for name, overrides in CONTINUAL.items():
      grown = run(args.out, 'digits_5to9' + ''.join(f'_{k}{v}' for k, v in overrides.items()),
                  s, digits_5to9.get_config, expand_from=old['workdir'], **overrides,
                  **args.epochs_override)
      for row in grown['forgetting']:
        table[name][row['data']].append(row['after'])
    # The upper bound: the same 12 branches trained jointly on all ten digits at once.
    joint = run(args.out, 'digits_all_12', s, digits.get_config,
                **{'model.num_branches': 12}, **args.epochs_override)
    for label, classes in (('old', '0-4'), ('new', '5-9'), ('all', '')):
      table['joint on 0-9'][label].append(class_accuracy(joint, classes))
  lines = ['## Expansion (continual learning): digits 0-4, then 4 branches added for 5-9', '',
           '`configs/digits_0to4.py` (8 branches, 5 classes), then `configs/digits_5to9.py` '
           '(4 new branches and 5 new head rows trained on 5-9; the old branches, embedding '
           'and head rows frozen), with no replay; with an exemplar memory of '
           f'{REPLAY_PER_CLASS} training images per old digit (`replay_per_class`, about 16% '
           'of them) mixed into training; and with replay plus weight aligning of the new head '
           'rows (`align_head`). The upper bound is a 12-branch model trained on all ten digits '
           f'at once (`configs/digits.py`, `model.num_branches=12`). {len(seeds)} seeds, test '
           'accuracy (%) of the final model, mean +- std [95% t-interval of the mean].', '',
           '| variant | old digits 0-4 | new digits 5-9 | all digits |', '|---|---|---|---|']
  for name, accs in table.items():
    lines.append(f'| {name} | ' + ' | '.join(cell_ci(accs[k]) for k in ('old', 'new', 'all'))
                 + ' |')
  lines += ['', 'The old model is still inside the expanded one, bit for bit (tested), in every '
            'variant; what replay and alignment change is the 10-way decision between the old '
            'rows and the new ones.', '']
  return lines


def parallel(args, seeds):
  """benchmarks/branch_parallel.py's table (its output is kept in --out like a run's)."""
  del seeds  # a timing, not a training run
  cached = os.path.join(args.out, 'branch_parallel.txt')
  if not os.path.exists(cached):
    script = os.path.join(os.path.dirname(args.docs), 'benchmarks', 'branch_parallel.py')
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, check=True)
    with open(cached, 'w') as f:
      f.write(out.stdout)
  text = open(cached).read().strip().splitlines()
  return ['## Branch-parallel inference on 2 processes', '',
          'Latency of one ParaFormer (32 px, patch 4, D=192, M=2) whose L branches are split '
          'over 2 processes (`jax.distributed` on 127.0.0.1, gloo, one core each), against the '
          'same model in one process on one core, and against a GPipe-style 2-stage pipeline '
          'of the sequential baseline of equal depth (1 x 2L blocks, micro-batches of 16) on '
          'the same 2 processes. Each multi-process output is checked against one process '
          'before it is timed. From `.venv/bin/python benchmarks/branch_parallel.py`:', '',
          text[0], ''] + text[1:-2] + ['', '- ' + text[-2], '- ' + text[-1], '',
          'Targets (L=8, batch 1, at least 1.6x better than one process and than the '
          'pipeline) are checked against these lines. At batch 1 a pipeline cannot overlap '
          'its stages (one micro-batch), so it pays both stages in turn plus the transfer; '
          'branches need only one sum of [batch, D] at the end.', '']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--parts', default=','.join(PARTS))
  parser.add_argument('--out', default='/tmp/pf_results', help='workdirs of the runs')
  parser.add_argument('--docs', default=os.path.dirname(os.path.abspath(__file__)),
                      help='where results.md and its plots go')
  parser.add_argument('--epochs', type=int, default=None,
                      help='override every run\'s epochs (a quick check of this script)')
  args = parser.parse_args()
  args.epochs_override = {} if args.epochs is None else {'training.epochs': args.epochs}
  logging.set_verbosity(logging.WARNING)
  seeds = list(range(args.seeds))
  command = '.venv/bin/python docs/make_results.py ' + ' '.join(
      f'--{k}={v}' for k, v in (('seeds', args.seeds), ('parts', args.parts),
                                ('epochs', args.epochs)) if v is not None)
  lines = ['# Results on scikit-learn\'s digits', '', 'Regenerated by', '', '```',
           command, '```', '',
           'on the project\'s 2-core CPU machine. 1,257 training, 180 validation and 360 test '
           'images of 8x8 pixels: a small set, so differences of a point or two are within '
           'the seed-to-seed spread. Plots: `results_scaling.png`, `results_modes.png`.', '']
  for part in args.parts.split(','):
    lines += {'scaling': scaling, 'modes': modes, 'expansion': expansion,
              'parallel': parallel}[part](args, seeds)
  path = os.path.join(args.docs, 'results.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
