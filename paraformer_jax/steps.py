"""Pure, jitted train and eval steps for every training mode.

Modes (config.training.mode):
  joint      one step on the full model's loss;
  lpa        the authors' schedule: an LPA pass step makes L optimizer updates on one
             minibatch, update i on the loss of branches 1..i with gradient clipping; a full
             pass step makes one unclipped update on the full loss;
  lpa_fused  one forward pass, the mean of all prefix losses, one update;
  stagewise  one step on the full loss, gradients only for the unfrozen parameters.
All forward passes run under shard_map (sharding.sharded_apply), on any mesh.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import optax

from paraformer_jax import optim, sharding

MODES = ('joint', 'lpa', 'lpa_fused', 'stagewise')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # minibatches consumed since the start of training (all stages)
  params: dict
  opt_state: dict  # optax state of the trained parameters only
  rng: jax.Array


def cross_entropy(logits, labels, mask=None, label_smoothing: float = 0.0):
  """Mean cross-entropy over the rows with mask 1 (all rows if mask is None).

  labels: integer [batch], or soft [batch, classes] (mixup / cutmix); label smoothing mixes
  the targets with the uniform distribution.
  """
  if labels.ndim == logits.ndim - 1 and not label_smoothing:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  else:
    targets = labels if labels.ndim == logits.ndim else jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
      targets = optax.smooth_labels(targets, label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
  if mask is None:
    return losses.mean()
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def accuracy(logits, labels, mask=None):
  """Share of rows (with mask 1) whose top logit is the label (soft labels: its top class)."""
  hard = labels if labels.ndim == logits.ndim - 1 else jnp.argmax(labels, -1)
  correct = (jnp.argmax(logits, -1) == hard).astype(jnp.float32)
  if mask is None:
    return correct.mean()
  return (correct * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def split_params(params, frozen_keys):
  trained = {k: v for k, v in params.items() if k not in frozen_keys}
  frozen = {k: v for k, v in params.items() if k in frozen_keys}
  return trained, frozen


def static_prefixes(model, mesh) -> bool:
  """Whether the LPA pass runs prefix model k on branches 1..k only. Static prefixes need
  every prefix size to split over the mesh's branch axis; with branches sharded, it runs the
  full model for every prefix (prefix_loss)."""
  return mesh.shape['branch'] == 1 and not model.num_frozen_branches


def make_train_step(model, mesh, tx, mode: str, frozen_keys=(), clip_norm: float = 1.0,
                    label_smoothing: float = 0.0, grad_clip_norm: float = 0.0):
  """Returns step(state, batch, lpa_pass=False) -> (state, metrics), jitted.

  batch: 'image', 'label' (integer or soft) and optionally 'mask' (rows with 0 count for
  nothing: images that did not decode).

  `frozen_keys` name top-level parameter groups that get no gradient and no optimizer
  update ('frozen_branches', 'frozen_head', and in later stages usually 'embed').
  `clip_norm` clips the lpa prefix updates (the authors'), `grad_clip_norm` (0: off) every
  update of every mode; where both apply, the smaller bound holds.
  """
  if mode not in MODES:
    raise ValueError(f'config.training.mode={mode!r}; choose one of {MODES}.')
  forward = sharding.sharded_apply(model, mesh)
  prefix = sharding.sharded_apply(model, mesh, 'prefix_logits')
  num_branches = model.num_branches  # the trained stack

  def loss_of(logits, batch):
    return cross_entropy(logits, batch['label'], batch.get('mask'), label_smoothing)

  def full_loss(params, batch, rng):
    logits = forward(params, batch['image'], True, rng)
    return loss_of(logits, batch), logits

  def fused_loss(params, batch, rng):
    logits = prefix(params, batch['image'], True, rng)  # [L, batch, classes]
    losses = jax.vmap(loss_of, in_axes=(0, None))(logits, batch)
    return losses.mean(), logits[-1]

  def prefix_loss(i):
    # A dynamic index keeps one copy of the model in the compiled loop over i; branches
    # after i get zero gradient here and are left out of the update by `num_present`.
    def loss(params, batch, rng):
      logits = jax.lax.dynamic_index_in_dim(prefix(params, batch['image'], True, rng), i,
                                            keepdims=False)
      return loss_of(logits, batch), logits
    return loss

  def prefix_only_loss(i):
    # Branches 1..i+1 only: a model of i + 1 branches on the first i + 1 parameter slices,
    # the work the authors' forward_step(x, i) does (about half of computing all L prefixes
    # and keeping one, averaged over i). Branch indices, hence dropout masks, are the same.
    # The prefix models run the full model's branch strategy ('auto' decides per prefix
    # size): on a CPU, 'unrolled' made the paper's LPA pass step 1.16x faster than 'fused'
    # (`benchmarks/lpa_routine.py`, docs/benchmarks.md).
    sub = sharding.sharded_apply(model.clone(num_branches=i + 1), mesh)

    def loss(params, batch, rng):
      sliced = {**params, 'branches': jax.tree.map(lambda a: a[:i + 1], params['branches'])}
      logits = sub(sliced, batch['image'], True, rng)
      return loss_of(logits, batch), logits
    return loss

  static = static_prefixes(model, mesh)

  def loss_and_grads(loss_fn, params, batch, rng):
    """((loss, logits), gradients of the trained parameters)."""
    trained, frozen = split_params(params, frozen_keys)
    return jax.value_and_grad(lambda t: loss_fn({**frozen, **t}, batch, rng),
                              has_aux=True)(trained)

  def apply(params, opt_state, batch, loss, logits, grads, clip, step, num_present=None):
    trained, frozen = split_params(params, frozen_keys)
    bounds = [n for n in (clip_norm if clip else 0.0, grad_clip_norm) if n]
    if bounds:
      grads, grad_norm = optim.clip_by_global_norm(grads, min(bounds))
    else:
      grad_norm = optax.global_norm(grads)
    trained, opt_state = optim.update(tx, grads, opt_state, trained, num_present, step)
    acc = accuracy(logits, batch['label'], batch.get('mask'))
    return {**frozen, **trained}, opt_state, {'loss': loss, 'accuracy': acc,
                                              'grad_norm': grad_norm}

  def update(params, opt_state, batch, rng, loss_fn, clip, step):
    (loss, logits), grads = loss_and_grads(loss_fn, params, batch, rng)
    return apply(params, opt_state, batch, loss, logits, grads, clip, step)

  def step(state, batch, lpa_pass=False):
    rng = jax.random.fold_in(state.rng, state.step)
    params, opt_state = state.params, state.opt_state
    if mode == 'lpa' and lpa_pass:
      # A loop over i with one copy of the clipping and Adam. Static prefixes: `lax.switch`
      # runs prefix model i's forward and backward pass (branches 1..i only); otherwise the
      # full model's prefix i. Gradients of the branches after i are zero, and `num_present`
      # keeps them out of the update.
      if static:
        prefix_grads = [functools.partial(loss_and_grads, prefix_only_loss(i))
                        for i in range(num_branches)]
        grads_of = lambda i, *args: jax.lax.switch(i, prefix_grads, *args)
      else:
        grads_of = lambda i, *args: loss_and_grads(prefix_loss(i), *args)

      def one(i, carry):
        params, opt_state, _ = carry
        (loss, logits), grads = grads_of(i, params, batch, jax.random.fold_in(rng, i))
        return apply(params, opt_state, batch, loss, logits, grads, clip=True,
                     step=state.step, num_present=i + 1)
      metrics = {k: jnp.zeros((), jnp.float32) for k in ('loss', 'accuracy', 'grad_norm')}
      params, opt_state, metrics = jax.lax.fori_loop(0, num_branches, one,
                                                     (params, opt_state, metrics))
    elif mode == 'lpa_fused':
      params, opt_state, metrics = update(params, opt_state, batch, rng, fused_loss, clip=False,
                                          step=state.step)
    else:
      params, opt_state, metrics = update(params, opt_state, batch, rng, full_loss, clip=False,
                                          step=state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, static_argnames='lpa_pass', donate_argnums=0)


def make_eval_step(model, mesh):
  """Returns step(params, batch) -> sums: correct per prefix [L], loss of the full model, count.

  Padding rows (mask 0) count for nothing, so summing over batches counts every example once.
  """
  prefix = sharding.sharded_apply(model, mesh, 'prefix_logits')

  def step(params, batch):
    logits = prefix(params, batch['image'])
    mask = batch['mask']
    correct = (jnp.argmax(logits, -1) == batch['label']) * mask
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[-1], batch['label'])
    return {'correct': correct.sum(-1), 'loss_sum': (losses * mask).sum(),
            'count': mask.sum()}

  return jax.jit(step)
