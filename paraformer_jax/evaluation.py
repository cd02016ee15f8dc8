"""Evaluation: the accuracy of every prefix of the model on a split, and the prefix report."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import logging

from paraformer_jax import input_pipeline, reporting, steps, storage, telemetry
from paraformer_jax.model import first_branches, merge_frozen, param_count


class Evaluator:
  """evaluate(model, params, source): accuracy of every prefix k = 1..L and the full model's
  loss, each example once. The batch sums stay on the device and come to the host once."""

  def __init__(self, config, mesh, shard, device_batch):
    self.config, self.mesh, self.shard, self.device_batch = config, mesh, shard, device_batch
    self._steps = {}  # compiled once per branch layout, not once per validation
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)

  def __call__(self, model, params, source):
    # All else comes from the config (the class count differs only for expansion's source).
    layout = (model.num_branches, model.num_frozen_branches, model.num_classes)
    if layout not in self._steps:
      self._steps[layout] = steps.make_eval_step(model, self.mesh)
    eval_step = self._steps[layout]
    batches = input_pipeline.eval_batches(source, self.config.data,
                                          self.config.eval_batch_size, self.shard)
    data = input_pipeline.iterate(batches, 0, self.config.workers)
    total = None
    try:
      for batch in telemetry.prefetch(data, self.device_batch, len(batches)):
        out = eval_step(params, batch)
        total = out if total is None else self._add(total, out)
    finally:
      data.close()
    total = telemetry.fetch(total)
    count = float(total['count'])
    if not count:
      raise ValueError(f'The evaluation split has no examples (config.data: {len(source)} '
                       f'examples, none readable); check the split names in config.data.')
    return {'prefix_accuracy': (total['correct'] / count).tolist(),
            'loss': float(total['loss_sum'] / count), 'count': int(count)}


def report(trainer, stage, state, name, split=None):
  """Test accuracy and parameter count of every prefix: printed, JSON, PNG."""
  d = trainer.config.data
  split = split or d.test_split
  source = input_pipeline.split_source(d, split)
  model, params = merge_frozen(trainer.plan.model(stage), state.params)
  result = trainer.evaluate(model, params, source)
  counts = [param_count(first_branches(model, params, k)[1])
            for k in range(1, model.num_branches + 1)]
  rows = reporting.prefix_rows(result['prefix_accuracy'], counts)
  title = (f'{name} (step {int(state.step)}): {d.name} {split}, {result["count"]} examples, '
           f'accuracy of the first k branches')
  if jax.process_index() == 0:
    print(reporting.prefix_table(rows, title), flush=True)
    base = trainer.workdir / f'{name}_prefix_accuracy'
    storage.write_atomic(f'{base}.json', json.dumps(
        {'step': int(state.step), 'split': split, 'loss': result['loss'],
         'count': result['count'], 'prefixes': rows}, indent=1))
    classes = f' (classes {d.classes})' if d.classes else ''
    title = (f'{trainer.workdir.name} ({trainer.config.training.mode}): {d.name} {split}'
             f'{classes}, step {int(state.step)}')
    reporting.plot_prefix(rows, f'{base}.png', title, d.num_classes, trainer.plan.expand_frozen)
    logging.info('Wrote %s.json and %s.png', base, base)
  return {'rows': rows, **result}
