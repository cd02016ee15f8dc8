"""Model compression: keep k of a trained ParaFormer's branches, in a workdir of its own.

  python -m paraformer_jax.compress --config=configs/digits.py --workdir=workdir/digits \
      --out=workdir/digits_k4 [--k=4 | --tolerance=0.01] [--select=greedy] \
      [--baseline=workdir/digits_vit]

Reports, for every k, parameters, validation and test accuracy and the compression ratio
against the full model; prints the smallest k whose validation accuracy is within
`--tolerance` of the full model's (the k written unless --k is given). `--select=prefix`
keeps branches 1..k; `--select=greedy` orders the branches by greedy forward selection on
validation accuracy (add, each time, the branch that helps most) and keeps the first k.
With `--baseline` (the workdir of a trained sequential ViT, num_branches=1), it also reports
the smallest k that is at least as accurate on the test split, and how many times fewer
parameters it has. The output workdir evaluates like any run:
  python -m paraformer_jax.main --config=workdir/digits_k4/config.py --workdir=... --mode=eval
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from paraformer_jax import cli, input_pipeline, processes, run_checks, sharding, storage, train
from paraformer_jax.model import merge_frozen, param_count

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a program: importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Config of the trained run.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir of the trained run.')
  flags.DEFINE_string('out', None, 'Workdir to write the compressed model to (must not exist).')
  flags.DEFINE_integer('k', None, 'Branches to keep (default: the smallest within --tolerance).')
  flags.DEFINE_float('tolerance', 0.01, 'Accuracy loss allowed against the full model (0.01 = 1 '
                     'point).')
  flags.DEFINE_enum('select', 'prefix', ['prefix', 'greedy'], 'Which branches to keep.')
  flags.DEFINE_string('baseline', None, 'Workdir of a trained sequential baseline to compare.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: best by validation, else latest).')
  processes.define_flags()
  flags.mark_flags_as_required(['config', 'workdir', 'out'])


def reorder(params, order):
  """params with the branch stack taken in `order` (a list of branch indices)."""
  idx = jnp.asarray(order)
  return {**params, 'branches': jax.tree.map(lambda a: a[idx], params['branches'])}


def greedy_order(trainer, model, params, source):
  """Branches ordered by greedy forward selection on accuracy over `source`."""
  order, remaining = [], list(range(model.num_branches))
  while remaining:
    def accuracy(j):
      candidate = order + [j] + [r for r in remaining if r != j]
      result = trainer.evaluate(
          model, sharding.params_to_mesh(reorder(params, candidate), trainer.mesh), source)
      return result['prefix_accuracy'][len(order)]
    best = max(remaining, key=accuracy)
    order.append(best)
    remaining.remove(best)
    logging.info('greedy selection: branch %d is number %d', best, len(order))
  return order


def check_k(k, num_branches: int):
  """--k: None (the smallest k within --tolerance) or 1..num_branches."""
  if k is not None and not 1 <= k <= num_branches:
    raise ValueError(f'--k={k}: the model has {num_branches} branches; keep 1..{num_branches} '
                     f'of them, or leave --k out for the smallest k within --tolerance.')


def compress(config, workdir, out, k=None, tolerance=0.01, select='prefix', baseline=None,
             step=None):
  """Writes the first-k (after `select`) model to `out`; returns the report as a dict."""
  if not 0 <= tolerance < 1:
    raise ValueError(f'--tolerance={tolerance:g}: use a share of accuracy in [0, 1), e.g. '
                     f'--tolerance=0.02 for 2 points below the full model.')
  run_checks.check_sources(config, workdir)
  run_checks.check_workdir(config, workdir)  # the config must be the run's
  run_checks.check_new_workdir(out)
  trainer = train.Trainer(config, workdir, create=False)
  step = trainer.ckpts.best_or_latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {trainer.ckpts.directory} to compress.')
  state, stage = trainer.restore(step)
  model, params = merge_frozen(trainer.plan.model(stage),
                               sharding.params_to_host(state.params))
  check_k(k, model.num_branches)
  d = config.data
  test = input_pipeline.split_source(d, d.test_split)
  order = (list(range(model.num_branches)) if select == 'prefix' else
           greedy_order(trainer, model, params, trainer.val_source))
  ordered = sharding.params_to_mesh(reorder(params, order), trainer.mesh)
  val = trainer.evaluate(model, ordered, trainer.val_source)['prefix_accuracy']
  tst = trainer.evaluate(model, ordered, test)['prefix_accuracy']
  counts = [param_count(reorder(params, order[:n])) for n in range(1, model.num_branches + 1)]
  rows = [{'branches': n + 1, 'params': counts[n], 'val_accuracy': val[n],
           'test_accuracy': tst[n], 'compression': counts[-1] / counts[n]}
          for n in range(model.num_branches)]
  within = next(r['branches'] for r in rows if r['val_accuracy'] >= val[-1] - tolerance)
  k = within if k is None else k
  report = {'source': str(storage.path(workdir)), 'step': step, 'select': select,
            'order': order, 'kept': order[:k], 'k': k, 'smallest_k_within_tolerance': within,
            'tolerance': tolerance, 'rows': rows}
  if baseline:
    base = json.loads((storage.path(baseline) / 'final_prefix_accuracy.json').read_text())[
        'prefixes'][-1]
    match = next((r for r in rows if r['test_accuracy'] >= base['accuracy']), None)
    report['baseline'] = {'params': base['params'], 'test_accuracy': base['accuracy'],
                          'matching_k': match and match['branches'],
                          'compression': match and base['params'] / match['params']}
  _write(config, trainer, out, params, order[:k], step, report)
  return report


def _write(config, trainer, out, params, kept, step, report):
  """A workdir holding the k-branch model: config.json, config.py, a checkpoint, the report."""
  small = ml_collections.ConfigDict(config.to_dict())
  small.model.num_branches = len(kept)
  if small.training.mode == 'stagewise':
    small.training.mode = 'joint'  # the compressed model is one stack, no stages
  small.training.branches_per_stage = 1
  small.init_from = small.expand_from = ''  # its parameters are all in the checkpoint
  kept_val = report['rows'][len(kept) - 1]['val_accuracy']  # of the kept branches, in order
  train.write_params_workdir(small, out, reorder(params, kept), step, 'paraformer_jax.compress',
                             kept_val)
  if jax.process_index() == 0:
    storage.write_atomic(storage.path(out) / 'compression.json', json.dumps(report, indent=1))


def main(argv):
  cli.no_positional_arguments(argv)
  cli.setup_logging()
  config = cli.config()
  processes.start()
  r = compress(config, FLAGS.workdir, FLAGS.out, FLAGS.k, FLAGS.tolerance, FLAGS.select,
               FLAGS.baseline, FLAGS.step)
  if jax.process_index():
    return  # process 0 prints
  print(f'{"branches":>8} {"params":>12} {"val acc":>8} {"test acc":>8} {"ratio":>6}')
  for row in r['rows']:
    print(f'{row["branches"]:>8} {row["params"]:>12,} {100 * row["val_accuracy"]:>7.2f}% '
          f'{100 * row["test_accuracy"]:>7.2f}% {row["compression"]:>5.2f}x')
  print(f'smallest k within {100 * r["tolerance"]:.1f} points of the full model (validation): '
        f'{r["smallest_k_within_tolerance"]}; kept {r["k"]} branches {r["kept"]} -> {FLAGS.out}')
  if 'baseline' in r:
    b = r['baseline']
    print(f'sequential baseline: {b["params"]:,} params, {100 * b["test_accuracy"]:.2f}% test; '
          + (f'k={b["matching_k"]} matches it with {b["compression"]:.2f}x fewer parameters'
             if b['matching_k'] else 'no k reaches its accuracy'))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
