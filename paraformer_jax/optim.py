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


def make_tx(training, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam / AdamW with the configured learning-rate schedule."""
  lr = training.learning_rate
  if training.schedule == 'cosine':
    total = max(training.epochs * steps_per_epoch, 1)
    warmup = int(training.warmup_epochs * steps_per_epoch)
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), total)
  elif training.schedule != 'constant':
    raise ValueError(f"config.training.schedule={training.schedule!r}; use 'constant' or "
                     f"'cosine'.")
  if training.optimizer == 'adam':
    return optax.adam(lr)
  if training.optimizer == 'adamw':
    return optax.adamw(lr, weight_decay=training.weight_decay)
  raise ValueError(f"config.training.optimizer={training.optimizer!r}; use 'adam' or 'adamw'.")


def _split(tree):
  return ({k: v for k, v in tree.items() if k in BRANCH_KEYS},
          {k: v for k, v in tree.items() if k not in BRANCH_KEYS})


def init(tx, params):
  branches, shared = _split(params)
  return {'branches': jax.vmap(tx.init)(branches), 'shared': tx.init(shared)}


def clip_by_global_norm(grads, max_norm: float):
  norm = optax.global_norm(grads)
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-6)), grads), norm


def update(tx, grads, state, params, num_present=None, update_mask=None):
  """New params and state; branches with index >= num_present (if given) are left as is.

  `update_mask`: {key: tree of 0/1 arrays} for shared parameter groups that change only
  where the mask is 1 (expansion: the old classes' head rows stay bit-identical, weight
  decay included).
  """
  g_branches, g_shared = _split(grads)
  p_branches, p_shared = _split(params)
  u_shared, s_shared = tx.update(g_shared, state['shared'], p_shared)
  u_branches, s_branches = jax.vmap(tx.update)(g_branches, state['branches'], p_branches)
  if num_present is not None:
    num = jax.tree.leaves(p_branches)[0].shape[0]
    present = jnp.arange(num) < num_present
    keep = lambda new, old: jnp.where(present.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    u_branches = jax.tree.map(lambda u: keep(u, jnp.zeros_like(u)), u_branches)
    s_branches = jax.tree.map(keep, s_branches, state['branches'])
  for key, mask in (update_mask or {}).items():
    u_shared[key] = jax.tree.map(lambda u, m: u * m, u_shared[key], mask)
  new_params = optax.apply_updates(params, {**u_shared, **u_branches})
  return new_params, {'branches': s_branches, 'shared': s_shared}
