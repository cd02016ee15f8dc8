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

from paraformer_jax import checkpoint, finetune, input_pipeline, replay, reporting, storage
from paraformer_jax.model import merge_frozen


def source_layout(workdir: str, num_classes: int) -> tuple[int, int]:
  """(branches, frozen ones included; classes) of the run in `workdir`, from metadata;
  refused if this run (`num_classes`) would drop some of its classes."""
  ckpts = checkpoint.Checkpoints(storage.path(workdir) / 'checkpoints', keep=None,
                                 create=False)
  step = ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f'config.expand_from={workdir!r} holds no checkpoint in '
                            f'{ckpts.directory}; point it at the workdir of a trained run.')
  shapes = ckpts.param_shapes(step)
  count = lambda stack: next((s[0] for k, s in shapes.items() if k.startswith(stack)), 0)
  classes = count("['head']['out']['bias']") + count("['frozen_head']['out']['bias']")
  if num_classes <= classes:
    raise ValueError(f'config.data.num_classes={num_classes}, but config.expand_from='
                     f'{workdir!r} already has {classes} classes; expansion adds classes: set '
                     f'config.data.num_classes above {classes} (and data.classes to the new '
                     f'ones).')
  return count("['branches']") + count("['frozen_branches']"), classes


def expanded_params(pretrained, fresh):
  """`fresh` (a model with frozen branches and classes) filled from `pretrained` (one merged
  stack and head): its embedding, branches and head become the frozen ones."""
  return {**fresh, 'embed': pretrained['embed'], 'frozen_branches': pretrained['branches'],
          'frozen_head': pretrained['head']}


def forgetting(trainer, state):
  """Test accuracy on the source run's data and on this run's, before and after expansion:
  printed, and written to forgetting.json."""
  d = trainer.config.data
  old = replay.old_classes(replay.old_data_config(trainer.config))
  new = input_pipeline.parse_classes(d.classes) or tuple(range(d.num_classes))
  spec = input_pipeline.format_classes
  branches, classes = trainer.source
  before_params, _ = finetune.load_pretrained(trainer.config.expand_from, trainer.mesh)
  model = trainer.plan.model(0)
  before = (model.clone(num_branches=branches, num_classes=classes, num_frozen_branches=0,
                       num_frozen_classes=0),
            before_params)
  after = merge_frozen(model, state.params)
  rows = []
  for label, labels in (('old', old), ('new', new), ('all', set(old) | set(new))):
    test = input_pipeline.split_source(d, d.test_split, classes=spec(labels))
    accuracy = [trainer.evaluate(m, p, test)['prefix_accuracy'][-1] for m, p in (before, after)]
    rows.append({'data': label, 'classes': spec(labels), 'examples': len(test),
                 'before': accuracy[0], 'after': accuracy[1],
                 'change': accuracy[1] - accuracy[0]})
  if jax.process_index() == 0:
    total = branches + model.num_branches
    print(reporting.forgetting_table(rows, branches, total), flush=True)
    storage.write_atomic(trainer.workdir / 'forgetting.json', json.dumps(rows, indent=1))
  return rows
