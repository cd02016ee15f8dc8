"""Expansion (continual learning): fresh branches trained on new data beside frozen old ones.

`config.expand_from` names a trained run. Its embedding and branches are frozen (they become
`params['frozen_branches']`, as in stagewise training) and `model.num_branches` fresh
branches are added. When the new config has more classes (`data.num_classes`), the head is
widened: the old classes' rows and the head's LayerNorm stay as they were, the new rows
start fresh. Only the new branches and the new head rows are updated, so the old model is
still inside the new one, bit for bit; what the new branches add to the sum is what can
make it forget, and `forgetting` measures that.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from paraformer_jax import checkpoint, finetune, input_pipeline, reporting, storage
from paraformer_jax.model import merge_frozen


def source_layout(workdir: str) -> tuple[int, int]:
  """(branches, frozen ones included; classes) of the run in `workdir`, from metadata."""
  ckpts = checkpoint.Checkpoints(storage.path(workdir) / 'checkpoints', keep=None,
                                 create=False)
  step = ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f'config.expand_from={workdir!r} holds no checkpoint in '
                            f'{ckpts.directory}; point it at the workdir of a trained run.')
  shapes = ckpts.param_shapes(step)
  count = lambda stack: next((s[0] for k, s in shapes.items() if k.startswith(stack)), 0)
  return (count("['branches']") + count("['frozen_branches']"),
          shapes["['head']['out']['bias']"][0])


def expanded_params(pretrained, fresh):
  """`fresh` (a model with frozen_branches) filled from `pretrained` (one merged stack)."""
  old, new = (p['head']['out']['bias'].shape[0] for p in (pretrained, fresh))
  if new < old:
    raise ValueError(f'config.data.num_classes={new} is below the {old} classes of '
                     f'config.expand_from; expansion keeps every old class.')
  # The old classes' rows from the old run, the new ones fresh.
  out = {k: jnp.concatenate([pretrained['head']['out'][k], v[..., old:]], axis=-1)
         for k, v in fresh['head']['out'].items()}
  head = {'norm': pretrained['head']['norm'], 'out': out}
  return {**fresh, 'embed': pretrained['embed'], 'frozen_branches': pretrained['branches'],
          'head': head}


def head_update_mask(head, old: int):
  """1 where the head may change (the new classes' rows), 0 elsewhere.

  Host arrays made from shapes alone: the train step holds them as constants, which a
  global array spanning processes cannot be.
  """
  new_rows = lambda a: np.broadcast_to(np.arange(a.shape[-1]) >= old, a.shape).astype(a.dtype)
  return {'norm': jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), head['norm']),
          'out': jax.tree.map(new_rows, head['out'])}


def forgetting(trainer, state):
  """Test accuracy on the source run's data and on this run's, before and after expansion:
  printed, and written to forgetting.json."""
  d = trainer.config.data
  saved = json.loads((storage.path(trainer.config.expand_from) / 'config.json').read_text())
  old_classes = saved['data'].get('classes', '')  # '' (all) in older workdirs
  branches, classes = trainer.source
  before_params, _ = finetune.load_pretrained(trainer.config.expand_from, trainer.mesh)
  model = trainer.plan.model(0)
  before = (model.clone(num_branches=branches, num_classes=classes, num_frozen_branches=0),
            before_params)
  after = merge_frozen(model, state.params)
  rows = []
  for label, spec in (('old', old_classes), ('new', d.classes)):
    test = input_pipeline.split_source(d, d.test_split, classes=spec)
    accuracy = [trainer.evaluate(m, p, test)['prefix_accuracy'][-1] for m, p in (before, after)]
    rows.append({'data': label, 'classes': spec or 'all', 'examples': len(test),
                 'before': accuracy[0], 'after': accuracy[1],
                 'change': accuracy[1] - accuracy[0]})
  if jax.process_index() == 0:
    total = branches + model.num_branches
    print(reporting.forgetting_table(rows, branches, total), flush=True)
    storage.write_atomic(trainer.workdir / 'forgetting.json', json.dumps(rows, indent=1))
  return rows
