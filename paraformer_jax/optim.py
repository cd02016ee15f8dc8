"""The optimizer, with one optax state per branch so that a step can leave branches out.

In the authors' LPA pass, step i computes the loss of branches 1..i only; PyTorch leaves the
other branches' gradients at None, and Adam then skips them: no update, no moment decay, no
step count. To reproduce that exactly, the optax state of the branch stack is vmapped over the
branch axis (each branch has its own moments and count) and a step updates only the branches
below `num_present`. Frozen branches (stagewise) are not in the trained tree at all: they get
no gradient and no state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

BRANCH_KEYS = ('branches',)  # trained trees whose leaves have a leading branch axis


def make_tx(training, steps_per_stage: int, warmup_steps: int = 0):
  """Adam / AdamW whose learning rate is a function of the minibatch step.

  optax's schedules read the optimizer's own update count, which in lpa advances L + 1 times
  per minibatch and differently per branch (each branch keeps its own Adam count): a cosine
  would reach 0 after about 1/(L+1) of training. Here the last transform scales by
  lr(step % steps_per_stage), `step` being the TrainState's minibatch count, passed by
  `update` (so each stagewise stage runs its own schedule). Adam's bias correction keeps the
  per-branch counts, as PyTorch's Adam does.
  """
  lr = training.learning_rate
  if training.schedule == 'cosine':
    cosine = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1),
                                                max(steps_per_stage, 1))
    schedule = lambda step: cosine(step % max(steps_per_stage, 1))
  elif training.schedule == 'constant':
    schedule = lambda step: lr
  else:
    raise ValueError(f"config.training.schedule={training.schedule!r}; use 'constant' or "
                     f"'cosine'.")
  if training.optimizer == 'adam':
    return optax.chain(optax.scale_by_adam(), scale_by_step_schedule(schedule))
  if training.optimizer == 'adamw':  # optax.adamw: the decay is scaled by the learning rate
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(training.weight_decay),
                       scale_by_step_schedule(schedule))
  if training.optimizer == 'adam_kernel_decay':
    # big_vision/optax.py: lr x Adam + wd x param on `kernel`s only, all times the schedule's
    # shape (its value over the peak): the decay is not scaled by the learning rate.
    return optax.chain(optax.scale_by_adam(), optax.scale(lr),
                       optax.add_decayed_weights(training.weight_decay, mask=kernels),
                       scale_by_step_schedule(lambda step: schedule(step) / lr))
  raise ValueError(f"config.training.optimizer={training.optimizer!r}; use 'adam', 'adamw' "
                   f"or 'adam_kernel_decay'.")


def kernels(params):
  """True on the leaves named 'kernel' (the Dense layers' weight matrices)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def scale_by_step_schedule(schedule) -> optax.GradientTransformationExtraArgs:
  """Scales updates by -schedule(step), `step` an extra argument of update (the minibatch
  step), not a count of the transform's own (it keeps no state)."""

  def update(updates, state, params=None, *, step=None, **extra):
    del params, extra
    if step is None:
      raise ValueError('this optimizer needs update(..., step=minibatch step)')
    lr = schedule(step)
    return jax.tree.map(lambda u: -lr * u, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _split(tree):
  return ({k: v for k, v in tree.items() if k in BRANCH_KEYS},
          {k: v for k, v in tree.items() if k not in BRANCH_KEYS})


def init(tx, params):
  branches, shared = _split(params)
  return {'branches': jax.vmap(tx.init)(branches), 'shared': tx.init(shared)}


def clip_by_global_norm(grads, max_norm: float):
  norm = optax.global_norm(grads)
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-6)), grads), norm


def update(tx, grads, state, params, num_present=None, step=None):
  """New params and state; branches with index >= num_present (if given) are left as is.

  `step`: the minibatch step, for make_tx's learning-rate schedule (other optax transforms
  ignore it).
  """
  g_branches, g_shared = _split(grads)
  p_branches, p_shared = _split(params)
  tx_update = lambda g, s, p: tx.update(g, s, p, step=step)
  u_shared, s_shared = tx_update(g_shared, state['shared'], p_shared)
  u_branches, s_branches = jax.vmap(tx_update)(g_branches, state['branches'], p_branches)
  if num_present is not None:
    num = jax.tree.leaves(p_branches)[0].shape[0]
    present = jnp.arange(num) < num_present
    keep = lambda new, old: jnp.where(present.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    u_branches = jax.tree.map(lambda u: keep(u, jnp.zeros_like(u)), u_branches)
    s_branches = jax.tree.map(keep, s_branches, state['branches'])
  new_params = optax.apply_updates(params, {**u_shared, **u_branches})
  return new_params, {'branches': s_branches, 'shared': s_shared}
