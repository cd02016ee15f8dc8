"""Our trainer's steps side by side with the authors' PyTorch model, in one run.

The paper's 32 px setting (`configs/cifar10.py:32px`: 8x2, D=192, 3 heads, MLP 768, patch 4,
reference block style, dropout 0.1, Adam at 1e-4, batch 64), f32 on CPU, two rows per
minibatch:
  - one training step with dropout on: ours is the trainer's full step in `lpa` mode
    (`steps.make_train_step`); theirs is forward, cross-entropy, backward, Adam, zero_grad;
  - the LPA routine, 8 clipped prefix updates and 1 full update: ours is the LPA pass step
    plus the full step; theirs is `train_ParaFormer2.py`'s loop, `forward_step(x, i)` for
    i = 0..7 with `clip_grad_norm_(1.0)` after each backward, then the full step.
First, the same weights: their model's initial weights loaded into ours
(`paraformer_jax.authors_weights`) must give their logits, and after one LPA routine from
them on the same batch (dropout off, so both are deterministic) the same parameters. The
four calls are timed round-robin (each round runs them all once), so a busy shared machine
slows all of them alike; medians over `--repeats` rounds after one warm-up round (which
compiles ours).

The authors' code is not ours to ship: pass a checkout of github.com/DUAT-Maker/
Shallow-Paraformer (models/ParaFormer.py is imported from it; we measured commit 7aa4532).
Needs `pip install torch einops` next to this project's requirements.

  .venv/bin/python benchmarks/authors_pytorch.py --authors_repo=PATH [--repeats=10]
Under tcmalloc, as the README recommends on a CPU (both frameworks share the process's malloc):
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0 \
      .venv/bin/python benchmarks/authors_pytorch.py ...
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model_throughput  # noqa: E402
from configs import cifar10  # noqa: E402
from paraformer_jax import authors_weights, run_state  # noqa: E402
from paraformer_jax.malloc import loaded_allocator  # noqa: E402


def authors_model(repo: str, config, dropout=None):
  """The authors' ViP (models/ParaFormer.py in `repo`) with the config's sizes (and its
  dropout, unless given)."""
  import torch  # noqa: F401  (imported here: only this benchmark needs it)
  path = os.path.join(repo, 'models', 'ParaFormer.py')
  if not os.path.exists(path):
    raise SystemExit(f'{path} not found: --authors_repo must be a checkout of '
                     'github.com/DUAT-Maker/Shallow-Paraformer')
  spec = importlib.util.spec_from_file_location('authors_paraformer', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  m = config.model
  dropout = m.dropout if dropout is None else dropout
  return module.ViP(image_size=config.data.image_size, patch_size=m.patch_size,
                    num_classes=10, dim=m.width, num_blocks=m.num_branches,
                    heads=m.num_heads, mlp_dim=m.mlp_dim, depth=m.branch_depth,
                    dropout=dropout, emb_dropout=dropout)


def logits_difference(net, images) -> tuple[float, float]:
  """(largest |logit| difference between their model and ours given their weights
  (paraformer_jax.authors_weights), largest |logit|): both in eval mode, on these images."""
  import torch
  net.eval()
  with torch.no_grad():
    theirs = net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())).numpy()
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  model = authors_weights.model_for(state)
  ours = model.apply({'params': authors_weights.to_params(state)}, jnp.asarray(images))
  return float(np.abs(np.asarray(ours) - theirs).max()), float(np.abs(theirs).max())


def authors_calls(net, images, labels, lr):
  """(full step, LPA routine) of the authors' training loop, as no-argument calls."""
  import torch
  x = torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())  # their input is NCHW
  y = torch.from_numpy(labels)
  opt = torch.optim.Adam(net.parameters(), lr=lr)
  loss_fn = torch.nn.CrossEntropyLoss()
  net.train()

  def update(outputs, clip):
    loss_fn(outputs, y).backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad()

  def full():
    update(net(x), clip=False)

  def routine():
    for i in range(net.num_blocks):
      update(net.forward_step(x, i), clip=True)
    full()
  return full, routine


def our_calls(model, params, training, images, labels):
  """(full step, LPA routine, [state]) of our trainer's `lpa` step on one device, from
  `params` and a fresh optimizer state."""
  batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
  step, state = model_throughput.trainer_step(model, batch['image'], mode='lpa',
                                              training=training, params=params)

  def run(lpa_pass):
    state[0], metrics = step(state[0], batch, lpa_pass=lpa_pass)
    return metrics

  def full():
    jax.block_until_ready(run(False))

  def routine():
    run(True)
    full()
  return full, routine, state


def routine_difference(repo, config, net, images, labels):
  """One LPA routine (8 clipped prefix updates, 1 full update; Adam) from the same weights on
  the same batch, dropout off in both: (share of parameters within 1e-6 of theirs, largest
  |difference|, largest |change| of a parameter in ours)."""
  plain = authors_model(repo, config, dropout=0.0)
  plain.load_state_dict(net.state_dict())
  weights = {k: v.detach().numpy().copy() for k, v in plain.state_dict().items()}
  authors_calls(plain, images, labels, config.training.learning_rate)[1]()
  theirs = authors_weights.to_params({k: v.numpy() for k, v in plain.state_dict().items()})
  start = authors_weights.to_params(weights)
  _, routine, state = our_calls(authors_weights.model_for(weights), start, config.training,
                                images, labels.astype(np.int32))
  routine()
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  ours = jax.device_get(state[0].params)
  diff = np.abs(flat(jax.tree.map(np.subtract, ours, theirs)))
  change = np.abs(flat(jax.tree.map(np.subtract, ours, start)))
  return float(np.mean(diff <= 1e-6)), float(diff.max()), float(change.max())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--authors_repo', required=True,
                      help='checkout of github.com/DUAT-Maker/Shallow-Paraformer')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help="torch's intra-op threads (XLA uses every core by default)")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  config = cifar10.get_config('32px')
  rng = np.random.default_rng(0)
  size = config.data.image_size
  images = rng.standard_normal((args.batch, size, size, 3)).astype(np.float32)
  labels = (np.arange(args.batch) % 10).astype(np.int64)
  net = authors_model(args.authors_repo, config)
  diff, scale = logits_difference(net, images)
  share, after, change = routine_difference(args.authors_repo, config, net, images, labels)
  theirs = authors_calls(net, images, labels, config.training.learning_rate)
  model = run_state.build_model(config)
  params = model.init(jax.random.key(0), jnp.asarray(images[:1]))['params']
  ours = our_calls(model, params, config.training, images, labels.astype(np.int32))
  calls = {('theirs', 'step'): theirs[0], ('ours', 'step'): ours[0],
           ('theirs', 'routine'): theirs[1], ('ours', 'routine'): ours[1]}
  times = {k: [] for k in calls}
  for round_ in range(args.repeats + 1):
    for k, fn in calls.items():
      start = time.perf_counter()
      fn()
      if round_:  # round 0 warms up and compiles ours
        times[k].append(time.perf_counter() - start)
  t = {k: statistics.median(v) for k, v in times.items()}
  print(f'torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} '
        f'({jax.default_backend()}); batch {args.batch}, {size} px, dropout '
        f'{config.model.dropout}, {config.model.num_branches}x{config.model.branch_depth}, '
        f'D={config.model.width}; medians of {args.repeats} rounds; malloc: {loaded_allocator()}')
  print(f'their initial weights in our model: logits within {diff:.1e} of theirs '
        f'(largest |logit| {scale:.2f})')
  print(f'one LPA routine from their weights, dropout off: {100 * share:.3f}% of the '
        f'parameters within 1e-6 of theirs, all within {after:.1e} (largest change '
        f'{change:.1e})')
  print('| per minibatch | authors\' PyTorch | ours | ratio |\n|---|---|---|---|')
  for kind, label in (('step', 'one training step (dropout on)'),
                      ('routine', 'the LPA routine (8 clipped prefix updates + 1 full update)')):
    a, o = args.batch / t['theirs', kind], args.batch / t['ours', kind]
    print(f'| {label} | {a:.2f} img/s | {o:.2f} img/s | {o / a:.2f}x |')
  spread = {k: (min(v), max(v)) for k, v in times.items()}
  print('per-call seconds (min..max): ' + ', '.join(
      f'{w} {k} {lo:.3f}..{hi:.3f}' for (w, k), (lo, hi) in spread.items()))


if __name__ == '__main__':
  main()
