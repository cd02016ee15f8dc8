"""Starting a run from another run's parameters (`config.init_from`): pre-train, then fine-tune.

The embedding and the branches are taken as they are; the head too when the class count is
the same, otherwise its Dense layer is freshly initialized (its LayerNorm is kept). The
optimizer starts afresh.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from paraformer_jax import checkpoint, storage
from paraformer_jax.model import merge_frozen_params


def load_pretrained(workdir: str, mesh):
  """(params, step) of a run's best checkpoint (by validation accuracy), else its latest.

  The parameters are replicated over `mesh` (this run's, whatever the other run's was) and
  a stagewise run's frozen branches are joined to the others in one stack, frozen first.
  """
  ckpts, step = pretrained_step(workdir)
  params = ckpts.restore_params(step, mesh)
  return jax.jit(merge_frozen_params)(params), step


def pretrained_step(workdir: str):
  """(checkpoints, step) that `load_pretrained` reads; refused if there is none (checked
  before the run writes anything)."""
  ckpts = checkpoint.Checkpoints(storage.path(workdir) / 'checkpoints', keep=None,
                                 create=False)
  step = ckpts.best_or_latest_step()
  if step is None:
    raise FileNotFoundError(f'{workdir!r} (config.init_from or config.expand_from) holds no '
                            f'checkpoint in {ckpts.directory}; point it at the workdir of a '
                            f'trained run.')
  return ckpts, step


def transfer(pretrained, fresh):
  """`fresh` params with everything `pretrained` has of the same shape; the rest explained."""
  paths = lambda tree: {jax.tree_util.keystr(p): a
                        for p, a in jax.tree_util.tree_leaves_with_path(tree)}
  old, new = paths(pretrained), paths(fresh)
  body = [k for k in new if not k.startswith("['head']['out']")]
  mismatched = [f'{k}: pretrained {np.shape(old.get(k))}, config {np.shape(new[k])}'
                for k in body if k not in old or np.shape(old[k]) != np.shape(new[k])]
  if mismatched:
    raise ValueError('config.init_from does not fit this model (embedding and branches must '
                     'match; only the head may change):\n  ' + '\n  '.join(mismatched[:5]))
  head_fits = all(np.shape(old.get(k)) == np.shape(new[k]) for k in new if k not in body)
  if not head_fits:
    logging.info('init_from: class count differs; the head Dense layer starts afresh.')
  keep = lambda k: k in body or head_fits
  flat = [(p, old[jax.tree_util.keystr(p)] if keep(jax.tree_util.keystr(p)) else a)
          for p, a in jax.tree_util.tree_leaves_with_path(fresh)]
  return jax.tree_util.tree_unflatten(jax.tree.structure(fresh), [a for _, a in flat])
