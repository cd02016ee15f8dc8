"""Seconds per minibatch of each training mode, measured in one run.

  lpa        its LPA step (L prefix updates) plus one full step: the work per minibatch
  lpa_fused  one step on the mean of the prefix losses
  joint      one step on the full loss
  stagewise  a step with k frozen branches and L-k trained, against joint over all L

Batches are random arrays of the dataset's shape (step time does not depend on the pixels).

  .venv/bin/python benchmarks/training_modes.py --config=digits
  .venv/bin/python benchmarks/training_modes.py --config=cifar32 --batch=64
"""
import argparse

import jax
import jax.numpy as jnp
from configs import cifar10, digits
from model_throughput import initial_state, timed
from paraformer_jax import optim, run_state, sharding, steps

CONFIGS = {'digits': (digits.get_config, 1), 'cifar32': (lambda: cifar10.get_config('32px'), 3)}


def step_runner(model, tx, mode, frozen_keys, batch, lpa_pass=None):
  """A no-argument function running one train step (state threaded through donation)."""
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  params = model.init(jax.random.key(0), batch['image'][:1])['params']
  state = [initial_state(params, tx, mesh, frozen_keys)]
  step = steps.make_train_step(model, mesh, tx, mode, frozen_keys)

  def run():
    state[0], metrics = step(state[0], batch, lpa_pass=bool(lpa_pass))
    return metrics['loss']
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='digits', choices=sorted(CONFIGS))
  parser.add_argument('--batch', type=int, default=None, help='default: the config\'s')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dropout', type=float, default=None, help="default: the config's")
  args = parser.parse_args()
  get_config, channels = CONFIGS[args.config]
  config = get_config()
  if args.dropout is not None:
    config.model.dropout = args.dropout
  tx = optim.make_tx(config.training, steps_per_stage=1000)  # the trainer's optimizer
  batch_size = args.batch or config.training.batch_size
  size = config.data.image_size
  batch = {'image': jax.random.normal(jax.random.key(1), (batch_size, size, size, channels)),
           'label': jnp.arange(batch_size) % config.data.num_classes}
  model = run_state.build_model(config)
  L = model.num_branches
  print(f'{args.config}: {size}px, L={L}, M={model.branch_depth}, D={model.width}, '
        f'dropout {model.dropout:g}, batch {batch_size}, backend {jax.default_backend()}')

  full = step_runner(model, tx, 'lpa', (), batch, lpa_pass=False)
  t = {'joint': timed(step_runner(model, tx, 'joint', (), batch), repeats=args.repeats),
       'lpa_fused': timed(step_runner(model, tx, 'lpa_fused', (), batch), repeats=args.repeats)}
  t['lpa'] = (timed(step_runner(model, tx, 'lpa', (), batch, lpa_pass=True), repeats=args.repeats)
              + timed(full, repeats=args.repeats))
  staged = model.clone(num_branches=1, num_frozen_branches=L - 1)
  t['stagewise'] = timed(step_runner(staged, tx, 'stagewise', ('frozen_branches', 'embed'), batch),
                         repeats=args.repeats)
  print('| mode | s / minibatch | vs lpa | vs joint |')
  print('|---|---|---|---|')
  for mode in ('lpa', 'lpa_fused', 'joint', 'stagewise'):
    label = f'stagewise ({L - 1} frozen + 1 trained)' if mode == 'stagewise' else mode
    if mode == 'lpa':
      label = f'lpa ({L} prefix updates + 1 full step)'
    print(f'| {label} | {t[mode]:.4f} | {t["lpa"] / t[mode]:.2f}x faster | '
          f'{t[mode] / t["joint"]:.2f}x the time |')


if __name__ == '__main__':
  main()
