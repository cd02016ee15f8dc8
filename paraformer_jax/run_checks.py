"""Checks of a run's settings and workdir, made before anything compiles or is written.

Bad settings get a one-line error naming the field, what it accepts, and the fix; a workdir
whose checkpoints were made with other settings is refused, never overwritten.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from paraformer_jax import input_pipeline, sharding, steps, storage
from paraformer_jax.run_state import build_model


def check_config(config, mesh):
  """Refuse, before anything compiles, settings that cannot work."""
  t = config.training
  if t.mode not in steps.MODES:
    raise ValueError(f'config.training.mode={t.mode!r}; choose one of {steps.MODES}.')
  if config.model.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={config.model.dtype!r}: use one of {DTYPES}, e.g. '
                     f'--config.model.dtype=bfloat16.')
  check_ranges(config)
  model = build_model(config)
  input_pipeline.check_config(config.data, t.batch_size // sharding.data_shard(mesh)[1])
  sharding.check_divisible(model, mesh, t.batch_size)
  sharding.check_divisible(model, mesh, config.eval_batch_size)
  if t.mode == 'stagewise':
    per, total = t.branches_per_stage, config.model.num_branches
    if per < 1 or total % per:
      raise ValueError(f'config.training.branches_per_stage={per} must divide '
                       f'model.num_branches={total}.')
    sharding.check_divisible(model.clone(num_branches=per), mesh)
    if config.init_from:
      raise ValueError('config.init_from with stagewise training is not supported yet; '
                       'fine-tune with joint, lpa or lpa_fused.')
  if (config.replay_per_class or config.align_head) and not config.expand_from:
    raise ValueError('config.replay_per_class and config.align_head apply to expansion: set '
                     'config.expand_from too, or leave them at 0 / False.')
  if config.expand_from and (t.mode not in ('joint', 'lpa_fused') or config.init_from):
    raise ValueError(f'config.expand_from trains the new branches with mode joint or '
                     f'lpa_fused (not {t.mode!r}) and without config.init_from.')
  # The image / patch check of the model, without compiling anything.
  jax.eval_shape(model.init, jax.random.PRNGKey(0),
                 jnp.zeros((1, config.data.image_size, config.data.image_size, 1)))


DTYPES = ('float32', 'bfloat16')  # the model's compute dtype (parameters: float32)

# (field, test, what it accepts): numbers that cannot work are refused before anything runs
# (a negative learning rate trained to chance accuracy and exited 0).
RANGES = (
    ('training.learning_rate', lambda v: v > 0, 'a number > 0'),
    ('training.epochs', lambda v: v >= 1, 'an integer >= 1'),
    ('training.batch_size', lambda v: v >= 1, 'an integer >= 1'),
    ('training.warmup_epochs', lambda v: v >= 0, 'a number >= 0'),
    ('training.weight_decay', lambda v: v >= 0, 'a number >= 0'),
    ('training.label_smoothing', lambda v: 0 <= v < 1, 'a value in [0, 1)'),
    ('training.clip_norm', lambda v: v > 0, 'a number > 0'),
    ('training.grad_clip_norm', lambda v: v >= 0, 'a number >= 0 (0: off)'),
    ('model.num_branches', lambda v: v >= 1, 'an integer >= 1'),
    ('model.branch_depth', lambda v: v >= 1, 'an integer >= 1'),
    ('model.width', lambda v: v >= 1, 'an integer >= 1'),
    ('model.num_heads', lambda v: v >= 1, 'an integer >= 1'),
    ('model.mlp_dim', lambda v: v >= 1, 'an integer >= 1'),
    ('model.patch_size', lambda v: v >= 1, 'an integer >= 1'),
    ('model.dropout', lambda v: 0 <= v < 1, 'a rate in [0, 1)'),
    ('data.image_size', lambda v: v >= 1, 'an integer >= 1'),
    ('data.num_classes', lambda v: v >= 2, 'an integer >= 2'),
    ('data.std', lambda v: v > 0, 'a number > 0'),
    ('eval_batch_size', lambda v: v >= 1, 'an integer >= 1'),
    ('eval_every_steps', lambda v: v >= 0, '0 (every epoch) or more'),
    ('log_every_steps', lambda v: v >= 1, 'an integer >= 1'),
    ('keep_checkpoints', lambda v: v >= 1, 'an integer >= 1'),
    ('checkpoint_every_minutes', lambda v: v >= 0, '0 (off) or a number of minutes > 0'),
    ('workers', lambda v: v >= 0, '0 (no worker processes) or more'),
    ('replay_per_class', lambda v: v >= 0, '0 (no replay) or more'),
)


def check_ranges(config):
  for field, ok, accepts in RANGES:
    value = config
    for part in field.split('.'):
      value = value.get(part) if value is not None else None
    if value is not None and not ok(value):
      raise ValueError(f'config.{field}={value!r}: use {accepts}.')


# Settings that give saved checkpoints their meaning: resuming under other values is refused
# (data.train_split: the examples an epoch is made of, and so the steps and what was seen).
# (model.dtype, dropout and branch_strategy may change: the parameters stay the same.)
RUN_DEFINING = ('seed', 'model.patch_size', 'model.width', 'model.num_heads', 'model.mlp_dim',
                'model.num_branches', 'model.branch_depth', 'model.block_style', 'model.pool',
                'model.posemb', 'model.pre_logits',
                'data.name', 'data.num_classes', 'data.image_size', 'training.mode',
                'training.batch_size', 'training.branches_per_stage', 'training.schedule',
                'data.classes', 'data.train_split', 'expand_from', 'replay_per_class')


def check_workdir(config, workdir: str):
  """Refuse to resume a run in a workdir whose checkpoints came from other settings."""
  if storage.path(workdir).is_file():
    raise NotADirectoryError(f'--workdir={workdir} is a file; pass a directory: a new one, or '
                             f'the workdir of a run to resume.')
  path = storage.path(workdir) / 'config.json'
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  current = json.loads(config.to_json_best_effort())
  # The epochs set a stage's steps, and with the cosine the schedule, as the warmup does.
  keys = RUN_DEFINING + (('training.epochs',) if config.training.mode == 'stagewise' or
                         config.training.schedule != 'constant' else ()) + (
      ('training.warmup_epochs',) if config.training.schedule != 'constant' else ())

  def get(tree, key):
    for part in key.split('.'):
      tree = tree.get(part) if isinstance(tree, dict) else None
    return tree

  # A setting missing from the saved config did not exist when the workdir was made.
  diffs = [f'{k}: {get(saved, k)!r} in the workdir, {get(current, k)!r} now' for k in keys
           if get(saved, k) is not None and get(saved, k) != get(current, k)]
  if diffs:
    raise ValueError(f'{workdir} holds a run made with other settings:\n  ' +
                     '\n  '.join(diffs) + f'\nUse a new --workdir (the checkpoints there are '
                     f'kept), or its settings: --config={path.parent / "config.py"}.')


def save_config(config, workdir: str, has_checkpoints: bool):
  """workdir/config.json: the settings the checkpoints are made with. Written when the run
  starts afresh; a resume with other (not run-defining) settings keeps it and says what
  differs. Never seen half-written by the other processes, which may still be in
  check_workdir (a fresh multi-host run used to crash there)."""
  path = storage.path(workdir) / 'config.json'
  text = config.to_json_best_effort(indent=1)
  if has_checkpoints and path.exists():
    saved, now = (_flatten(json.loads(t)) for t in (path.read_text(), text))
    changed = [f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
      logging.warning('Resuming with settings that differ from %s (which keeps those the run '
                      'started with): %s', path, '; '.join(changed))
    return
  storage.write_atomic(path, text)
  storage.write_atomic(path.parent / 'config.py', config_file(text, 'paraformer_jax.main'))


def config_file(as_json: str, written_by: str) -> str:
  """A self-contained config file holding `as_json` (--config=WORKDIR/config.py reproduces
  the run; absl reads config files from local disk only: copy one from a bucket first)."""
  return (f'"""The config of the run in this workdir (written by {written_by})."""\n'
          'import json\nimport ml_collections\n\n\ndef get_config():\n'
          f'  return ml_collections.ConfigDict(json.loads({as_json!r}))\n')


def _flatten(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}


def check_sources(config, workdir: str):
  """Every remote path of the run reachable, before anything trains (storage.check_access)."""
  for what, path in (('--workdir', workdir), ('config.data.data_dir', config.data.data_dir),
                     ('config.init_from', config.init_from),
                     ('config.expand_from', config.expand_from)):
    if path:
      storage.check_access(path, what)


def check_new_workdir(out: str):
  """Refuses an --out that exists or whose bucket cannot be reached, before any work."""
  storage.check_access(out, '--out')
  if storage.path(out).exists():
    raise FileExistsError(f'--out={out} exists; pick a new directory (nothing is overwritten).')


def check_profile_steps(profile_steps, total_steps: int):
  """`config.profile_steps`: () or (first step, count) within the run's steps."""
  if not profile_steps:
    return
  ok = len(profile_steps) == 2 and all(isinstance(v, int) for v in profile_steps)
  first, count = profile_steps if ok else (-1, 0)
  if not ok or first < 0 or count < 1 or first + count > total_steps:
    raise ValueError(f'config.profile_steps={tuple(profile_steps)!r}: use (first step, count) '
                     f'with first >= 0, count >= 1 and first + count <= {total_steps} (the '
                     f'run\'s steps), e.g. --config.profile_steps="(10, 5)"; or () for none.')


def state_bytes_per_device(abstract_state) -> int:
  """Bytes of a TrainState (parameters and optimizer state) on one device, as sharded."""
  return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract_state))


def memory_per_device(device) -> tuple[int | None, str]:
  """(bytes one device may hold, what they are): an accelerator's own memory; on a CPU the
  host's memory, shared by this process's devices."""
  if device.platform == 'cpu':
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return total // jax.local_device_count(), 'host memory'
  limit = (device.memory_stats() or {}).get('bytes_limit')
  return limit, f'{device.device_kind} memory'


def check_memory(config, abstract_state, mesh):
  """Refuses, before anything is built or written, a model whose parameters and optimizer
  state alone exceed what a device holds (activations come on top)."""
  need = state_bytes_per_device(abstract_state)
  device = mesh.devices.flat[0]
  have, what = memory_per_device(device)
  if have is None or need <= have:
    return
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_state.params))
  m = config.model
  n = jax.local_device_count()
  share = (f', shared by its {n} CPU devices' if device.platform == 'cpu' and n > 1 else '')
  raise ValueError(
      f'The model does not fit: {params:,} parameters (model.num_branches={m.num_branches}, '
      f'branch_depth={m.branch_depth}, width={m.width}) need {need / 2**30:.1f} GiB of '
      f'parameters and optimizer state per device, more than the {have / 2**30:.1f} GiB of '
      f'{what}{share}. Lower model.num_branches, branch_depth or width, or split the '
      f'branches over more devices (config.mesh.branch).')
