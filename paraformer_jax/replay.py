"""Continual learning that remembers: an exemplar memory of the old classes, and head alignment.

Expansion (`expand.py`) trains new branches and head rows on the new classes only, and they
then outvote the frozen old model on old test images (class-incremental forgetting). Two
standard remedies, each a config field:

- `replay_per_class = n`: n training examples of each old class, drawn once from the old
  run's training split (its `data.classes`, this run's `data.data_dir`), are kept in this
  run's workdir (`replay.json`, their indices in that split) and mixed into the new
  classes' training examples: every epoch shuffles both together (iCaRL-style exemplar
  replay with a fixed budget per class).
- `align_head = True`: after the last step, the new classes' head rows (kernel columns and
  biases) are scaled by mean ||old row|| / mean ||new row|| ("weight aligning", Zhao et al.,
  CVPR 2020), so that new logits are not larger merely because they were trained last.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from paraformer_jax import input_pipeline, storage


def old_data_config(config):
  """The data settings of config.expand_from's run (from its config.json), read with this
  run's data_dir."""
  saved = json.loads((storage.path(config.expand_from) / 'config.json').read_text())
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    for field in ('name', 'train_split', 'classes', 'num_classes'):
      if field in saved['data']:
        data[field] = saved['data'][field]
  return data


def old_classes(old_data) -> tuple[int, ...]:
  return input_pipeline.parse_classes(old_data.classes) or tuple(range(old_data.num_classes))


def check_disjoint(config, old_data):
  """Expansion adds classes: the new run's classes must not be the old run's."""
  new = input_pipeline.parse_classes(config.data.classes) or tuple(
      range(config.data.num_classes))
  overlap = sorted(set(new) & set(old_classes(old_data)))
  if overlap:
    raise ValueError(
        f'config.data.classes={config.data.classes!r} overlaps the classes of '
        f'config.expand_from={config.expand_from!r} ({old_data.classes or "all"}): '
        f'{",".join(map(str, overlap))}. Expansion trains new classes only; set '
        f'config.data.classes to classes the old run did not have.')


def draw(old_source, classes, per_class: int, seed: int) -> list[int]:
  """`per_class` indices of `old_source` (its full split) for each class, without
  replacement, seeded; refused if a class has fewer examples."""
  labels = input_pipeline.labels_of(old_source)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if per_class > len(members):
      raise ValueError(f'config.replay_per_class={per_class} is more than the {len(members)} '
                       f'training examples of old class {c}; use at most {len(members)}.')
    chosen += sorted(rng.choice(members, per_class, replace=False).tolist())
  return chosen


def memory(config, old_data, workdir, seed: int):
  """The exemplar memory of an expansion run: (source of the replayed examples, record).

  Drawn on the first start (and kept by `keep`); later starts read workdir/replay.json, so
  a resumed run replays the same examples. `old_data`: old_data_config(config).
  """
  old_source = input_pipeline.get_source(old_data.name, old_data.train_split, old_data.data_dir)
  path = storage.path(workdir) / 'replay.json'
  if path.exists():
    record = json.loads(path.read_text())
    if record['per_class'] != config.replay_per_class:
      raise ValueError(f'{path} holds {record["per_class"]} examples per class, the config '
                       f'replay_per_class={config.replay_per_class}; use a new --workdir.')
  else:
    classes = old_classes(old_data)
    record = {'source': str(config.expand_from), 'dataset': old_data.name,
              'split': old_data.train_split, 'classes': list(classes),
              'per_class': config.replay_per_class,
              'indices': draw(old_source, classes, config.replay_per_class, seed)}
  return input_pipeline.Subset(old_source, record['indices']), record


def keep(record, workdir):
  """workdir/replay.json, once: the examples this run replays."""
  path = storage.path(workdir) / 'replay.json'
  if not path.exists():
    storage.write_atomic(path, json.dumps(record))


def align_head(params):
  """params with the new classes' head rows scaled to the old rows' mean norm (weight
  aligning); the old rows (params['frozen_head']) are untouched."""
  head = params['head']['out']  # the new rows only (expansion keeps the old ones frozen)
  old_head = params['frozen_head']['out']
  norm = lambda kernel: jnp.linalg.norm(kernel, axis=0).mean()
  gamma = norm(old_head['kernel']) / norm(head['kernel'])
  out = {k: v * gamma for k, v in head.items()}
  return {**params, 'head': {**params['head'], 'out': out}}
