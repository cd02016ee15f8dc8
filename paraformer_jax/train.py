"""Training and evaluation loops: stages, checkpoints, resume, validation, reports.

Every mode runs as a sequence of stages (one stage unless `stagewise`). Stage s trains its
model for `steps_per_stage` minibatches; the global step counts minibatches over all stages,
and batch i of a stage is a pure function of (seed, stage, i), so a restored step is all
that exact resume needs. A stagewise stage ends with a checkpoint in workdir/stages that the
next stage restores and extends with fresh branches.
"""
from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from paraformer_jax import (checkpoint, expand, input_pipeline, malloc, optim, replay,
                            reporting, run_state, sharding, steps, storage)
from paraformer_jax.preemption import Interrupted, Preemption
from paraformer_jax.model import first_branches, merge_frozen, param_count
from paraformer_jax.run_state import StagePlan, StateMaker, build_model


def check_config(config, mesh):
  """Refuse, before anything compiles, settings that cannot work."""
  t = config.training
  if t.mode not in steps.MODES:
    raise ValueError(f'config.training.mode={t.mode!r}; choose one of {steps.MODES}.')
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


class CorruptCount:
  """Training images that did not decode (skipped): a stop once there are too many.

  Too many: more than `max_fraction` of the rows seen, or, during the first pass, of the
  split (so a dataset that is mostly corrupt stops early, not after an epoch).
  """

  def __init__(self, max_fraction: float, split_size: int):
    self.max_fraction, self.split_size = max_fraction, split_size
    self.seen = self.skipped = 0

  def add(self, mask):
    self.seen += mask.size
    self.skipped += int(mask.size - np.count_nonzero(mask))

  def check(self):
    seen, skipped = self.seen, self.skipped
    if jax.process_count() > 1:  # every process decides alike
      seen, skipped = multihost_utils.process_allgather(np.array([seen, skipped])).sum(0)
    if skipped > self.max_fraction * max(seen, self.split_size):
      raise ValueError(
          f'{skipped} of {seen} training images read so far did not decode (see the warnings '
          f'above for their indices), more than config.data.max_corrupt_fraction='
          f'{self.max_fraction}. Repair or re-prepare the dataset, or raise that fraction. '
          f'The last checkpoint is intact.')


class Trainer:
  """Holds what a run shares between stages: mesh, data, checkpoints, writer."""

  def __init__(self, config, workdir: str, create: bool = True):
    """`create=False`: only read the workdir (evaluation), never make directories in it."""
    self.config = config
    self.workdir = storage.path(workdir)
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.branch)
    check_config(config, self.mesh)
    # Expansion: (branches, classes) of the run whose model is kept inside this one.
    self.source = (expand.source_layout(config.expand_from, config.data.num_classes)
                   if config.expand_from else (0, 0))
    d = config.data
    self.train_source, self.replay = self._training_examples()
    self.val_source = input_pipeline.split_source(d, d.val_split)
    self.channels = input_pipeline.image_channels(self.train_source)
    self.shard = sharding.data_shard(self.mesh)
    spe = input_pipeline.steps_per_epoch(self.train_source, config.training.batch_size)
    if spe < 1:
      raise ValueError(f'The training split has {len(self.train_source)} examples, fewer than '
                       f'one batch of {config.training.batch_size}; lower the batch size.')
    self.plan = StagePlan(config, spe, *self.source)
    self.tx = optim.make_tx(config.training, self.plan.steps_per_stage,
                            self.plan.warmup_steps)
    image_size = config.data.image_size
    self.states = StateMaker(config, self.plan, self.tx, self.mesh,
                             (image_size, image_size, self.channels))
    self._open_checkpoints(create)
    self._eval_steps = {}  # compiled once per branch layout, not once per validation
    # uint8 host batches -> the model's input, on device (input_pipeline.finish).
    self._finish = jax.jit(functools.partial(input_pipeline.finish, mean=d.mean, std=d.std,
                                             num_classes=d.num_classes))

  def _training_examples(self):
    """(source, replay record): the split's examples of data.classes, and in an expansion
    with replay the old classes' exemplars after them (replay.py)."""
    config, d = self.config, self.config.data
    source = input_pipeline.split_source(d, d.train_split)
    if not config.expand_from:
      return source, None
    old_data = replay.old_data_config(config)
    replay.check_disjoint(config, old_data)
    if not config.replay_per_class:
      return source, None
    replayed, record = replay.memory(config, old_data, self.workdir,
                                     run_state.stream_seed(config.seed, 'replay'))
    return input_pipeline.Concat(source, replayed), record

  def _open_checkpoints(self, create: bool):
    self.ckpts = checkpoint.Checkpoints(self.workdir / 'checkpoints',
                                        keep=self.config.keep_checkpoints, create=create)
    self.stage_ckpts = checkpoint.Checkpoints(self.workdir / 'stages', keep=None,
                                              keep_best=False,
                                              create=create and self.plan.stagewise)

  def open_for_writing(self):
    """Makes the workdir and its checkpoint directories (a Trainer made with create=False
    has checked every setting and input without writing anything)."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._open_checkpoints(create=True)
    if self.replay and jax.process_index() == 0:
      replay.keep(self.replay, self.workdir)

  def device_batch(self, batch):
    """This process's host batch -> the global batch the steps take, on device."""
    return self._finish(sharding.global_batch(self.mesh, batch))

  def restore(self, step, ckpts=None):
    """(state, stage) of checkpoint `step` of this run (or of `ckpts`)."""
    return self.states.restore(ckpts or self.ckpts, step)

  # ---- loops ------------------------------------------------------------------------------

  def evaluate(self, model, params, source):
    """Accuracy of every prefix k = 1..L and the full model's loss, each example once."""
    # All else comes from the config (the class count differs only for expansion's source).
    layout = (model.num_branches, model.num_frozen_branches, model.num_classes)
    if layout not in self._eval_steps:
      self._eval_steps[layout] = steps.make_eval_step(model, self.mesh)
    eval_step = self._eval_steps[layout]
    total = None
    batches = input_pipeline.eval_batches(source, self.config.data,
                                          self.config.eval_batch_size, self.shard)
    data = input_pipeline.iterate(batches, 0, self.config.workers)
    try:
      for batch in data:
        out = jax.device_get(eval_step(params, self.device_batch(batch)))
        total = out if total is None else jax.tree.map(np.add, total, out)
    finally:
      data.close()
    count = float(total['count'])
    if not count:
      raise ValueError(f'The evaluation split has no examples (config.data: {len(source)} '
                       f'examples, none readable); check the split names in config.data.')
    return {'prefix_accuracy': (total['correct'] / count).tolist(),
            'loss': float(total['loss_sum'] / count), 'count': int(count)}

  def validate_and_save(self, stage, state, writer):
    model = self.plan.model(stage)
    result = self.evaluate(model, state.params, self.val_source)
    step = int(state.step)
    metrics = {'val_accuracy': result['prefix_accuracy'][-1], 'val_loss': result['loss']}
    writer.write(step, metrics)
    logging.info('step %d validation: accuracy %.4f loss %.4f (%d examples)', step,
                 metrics['val_accuracy'], metrics['val_loss'], result['count'])
    self.ckpts.save(step, state, {'stage': stage}, metrics=metrics)
    return metrics

  def train_stage(self, stage, state, writer, preemption):
    """Trains to the end of the stage; returns its state."""
    plan, config = self.plan, self.config
    model = plan.model(stage)
    train_step = steps.make_train_step(model, self.mesh, self.tx, config.training.mode,
                                       plan.frozen_keys(stage), config.training.clip_norm,
                                       config.training.label_smoothing)
    start = int(state.step) - stage * plan.steps_per_stage
    batches = input_pipeline.train_batches(self.train_source, config.data,
                                           config.training.batch_size,
                                           run_state.data_seed(config.seed, stage), self.shard)
    data = input_pipeline.iterate(batches, start, config.workers)
    try:
      return self._train_loop(stage, state, train_step, data, writer, preemption)
    finally:
      data.close()  # stops the worker processes

  def _train_loop(self, stage, state, train_step, data, writer, preemption):
    plan, config = self.plan, self.config
    model = plan.model(stage)
    start = int(state.step) - stage * plan.steps_per_stage
    corrupt = CorruptCount(config.data.max_corrupt_fraction, len(self.train_source))
    eval_every = config.eval_every_steps or plan.steps_per_epoch * plan.passes  # lpa: 2
    label = f'stage {stage + 1}/{plan.num_stages} ' if plan.stagewise else ''
    offset, total = stage * plan.steps_per_stage, plan.num_stages * plan.steps_per_stage
    logging.info('%straining %s: %s trained, %d frozen; steps %d..%d of %d', label,
                 config.training.mode, _count(model.num_branches, 'branch'),
                 model.num_frozen_branches, offset + start, offset + plan.steps_per_stage,
                 total)
    clock = _Clock(start)
    for i in range(start, plan.steps_per_stage):
      began = time.perf_counter()
      batch = next(data)
      corrupt.add(batch['mask'])
      batch = self.device_batch(batch)
      lpa_pass = config.training.mode == 'lpa' and (i // plan.steps_per_epoch) % 2 == 0
      first, program = clock.first_call(lpa_pass), 'LPA pass step' if lpa_pass else 'training step'
      if first:  # the paper's LPA pass step compiles ~45 s on a 2-core CPU
        logging.info('%scompiling the %s (first call)...', label, program)
        called = time.perf_counter()
      state, metrics = train_step(state, batch, lpa_pass=lpa_pass)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if first:
        logging.info('%scompiled the %s and ran its first call in %.1f s', label, program,
                     time.perf_counter() - called)
      step = int(state.step)
      if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(
            f'Non-finite training metrics at step {step}: {metrics}. Stopped; the last good '
            f'checkpoint is step {self.ckpts.latest_step()} in {self.ckpts.directory}. Lower '
            f'the learning rate or check the data.')
      done = i + 1
      if done == plan.steps_per_stage and config.align_head:
        state = state.replace(params=jax.jit(replay.align_head)(state.params))
      clock.tick(done, compiled=lpa_pass, seconds=time.perf_counter() - began)
      if done % config.log_every_steps == 0 or done == plan.steps_per_stage:
        ips, eta = clock.rate(done, total - offset, config.training.batch_size)
        logging.info(reporting.progress_line(label, step, total, metrics, ips, eta))
        writer.write(step, {**metrics, 'images_per_s': ips or 0.0, 'stage': stage})
        corrupt.check()
      if done == plan.steps_per_stage:
        writer.write(step, {'train_seconds': clock.train_seconds(done - start)})
      saved = done % eval_every == 0 or done == plan.steps_per_stage
      if saved:
        self.validate_and_save(stage, state, writer)
      signum = preemption.requested()
      if signum:
        if not saved:
          self.ckpts.save(step, state, {'stage': stage})
        self.ckpts.wait()
        logging.warning('Preempted: saved step %d in %s; the same command resumes from it.',
                        step, self.ckpts.directory)
        raise Interrupted(signum, step, self.ckpts.directory)
    return state

  def run(self):
    """Trains every remaining stage and reports. On SIGTERM or Ctrl-C it saves after the
    current step and raises Interrupted."""
    writer = reporting.MetricWriter(self.workdir)
    try:
      with Preemption() as preemption:
        state = self._train_stages(writer, preemption)
      self.ckpts.wait()
      results = report(self, self.plan.num_stages - 1, state, 'final')
      if self.config.expand_from:
        results['forgetting'] = expand.forgetting(self, state)
      return results
    finally:
      writer.close()

  def _train_stages(self, writer, preemption):
    latest = self.ckpts.latest_step()
    if latest is None:
      state, layout = self.states.initial(), 0
    else:
      state, layout = self.restore(latest)  # layout: the stage whose parameters state holds
      logging.info('Resuming from step %d (stage %d) in %s', latest, layout,
                   self.ckpts.directory)
    for stage in range(layout, self.plan.num_stages):
      if int(state.step) >= (stage + 1) * self.plan.steps_per_stage:
        continue  # this stage had already finished
      if layout < stage:
        state, layout = self.states.extend(state, stage), stage
      state = self.train_stage(stage, state, writer, preemption)
      if self.plan.stagewise:  # kept for users: the model as each stage left it
        # One save in flight at a time: a 2-process run once failed here, its finalize of
        # checkpoints/ step N finding one process's array metadata while stages/ saved N.
        self.ckpts.wait()
        self.stage_ckpts.save(int(state.step), state, {'stage': stage})
        self.stage_ckpts.wait()
    return state


def _count(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 'es' if noun.endswith('ch') else 's')


class _Clock:
  """Images/s and time left, from the steps since the last compile: the first step of each
  compiled program (lpa has two) is left out, so the first ETA does not count compiling."""

  def __init__(self, start: int):
    self.since, self.step, self.seen = None, start, set()
    self.step_seconds, self.timed_steps = 0.0, 0

  def first_call(self, program) -> bool:
    """Whether `program`'s step has not run yet (it compiles on its first call)."""
    return program not in self.seen

  def tick(self, done: int, compiled, seconds: float = 0.0):
    """`seconds`: what step `done` took (input, step, metrics), evaluation not included."""
    if self.first_call(compiled):  # this step ran a program compiled for it
      self.seen.add(compiled)
      self.since, self.step = time.perf_counter(), done
    else:
      self.step_seconds += seconds
      self.timed_steps += 1

  def train_seconds(self, steps: int) -> float:
    """Seconds `steps` steps take without compiling or evaluating: the steps that compiled
    are counted at the mean of the others (docs/make_results.py compares modes by it)."""
    return self.step_seconds / max(self.timed_steps, 1) * steps

  def rate(self, done: int, steps_left_from: int, batch_size: int):
    """(images/s, seconds to step `steps_left_from`), or (None, None) with nothing timed."""
    if done == self.step:
      return None, None
    per_step = (time.perf_counter() - self.since) / (done - self.step)
    return batch_size / per_step, (steps_left_from - done) * per_step


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


# Settings that give saved checkpoints their meaning: resuming under other values is refused.
# (model.dtype, dropout and branch_strategy may change: the parameters stay the same.)
RUN_DEFINING = ('seed', 'model.patch_size', 'model.width', 'model.num_heads', 'model.mlp_dim',
                'model.num_branches', 'model.branch_depth', 'model.block_style', 'model.pool',
                'data.name', 'data.num_classes', 'data.image_size', 'training.mode',
                'training.batch_size', 'training.branches_per_stage', 'training.schedule',
                'data.classes', 'expand_from', 'replay_per_class')


def check_workdir(config, workdir: str):
  """Refuse to resume a run in a workdir whose checkpoints came from other settings."""
  path = storage.path(workdir) / 'config.json'
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  current = json.loads(config.to_json_best_effort())
  keys = RUN_DEFINING + (('training.epochs',) if config.training.mode == 'stagewise' or
                         config.training.schedule != 'constant' else ())

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
                     f'kept), or the settings in {path}.')


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


def _flatten(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}


def check_sources(config, workdir: str):
  """Every remote path of the run reachable, before anything trains (storage.check_access)."""
  for what, path in (('--workdir', workdir), ('config.init_from', config.init_from),
                     ('config.expand_from', config.expand_from)):
    if path:
      storage.check_access(path, what)


def check_new_workdir(out: str):
  """Refuses an --out that exists or whose bucket cannot be reached, before any work."""
  storage.check_access(out, '--out')
  if storage.path(out).exists():
    raise FileExistsError(f'--out={out} exists; pick a new directory (nothing is overwritten).')


def write_params_workdir(config, out, params, step: int, written_by: str,
                         val_accuracy: float | None = None):
  """A new workdir (see check_new_workdir) holding `params` as its checkpoint at `step`:
  config.json and a self-contained config.py (for --config=OUT/config.py), so that
  --mode=eval, compress and config.init_from take it like a trained run's. The checkpoint's
  metric is `val_accuracy`, or the model's accuracy on the validation split when not given."""
  out = storage.path(out)
  out.mkdir(parents=True)
  as_json = config.to_json_best_effort(indent=1)
  storage.write_atomic(out / 'config.json', as_json)
  # Self-contained, so that a copy of it works anywhere (absl reads config files from
  # local disk only: copy it from a bucket first).
  storage.write_atomic(out / 'config.py', (
      f'"""The config of the model in this workdir (written by {written_by})."""\n'
      'import json\nimport ml_collections\n\n\ndef get_config():\n'
      f'  return ml_collections.ConfigDict(json.loads({as_json!r}))\n'))
  writer = Trainer(config, out)
  state = writer.states.initial()
  state = state.replace(step=jnp.asarray(step, jnp.int32), params=jax.device_put(
      params, sharding.param_shardings(params, writer.mesh)))
  if val_accuracy is None:
    model = writer.plan.model(0)
    val_accuracy = writer.evaluate(model, state.params, writer.val_source)[
        'prefix_accuracy'][-1]
  writer.ckpts.save(step, state, {'stage': 0}, metrics={'val_accuracy': val_accuracy})
  writer.ckpts.wait()
  return val_accuracy


def train_and_evaluate(config, workdir: str):
  """Trains (resuming from workdir if it holds checkpoints), then reports test accuracy."""
  check_sources(config, workdir)
  check_workdir(config, workdir)
  trainer = Trainer(config, workdir, create=False)  # every setting and input checked...
  trainer.open_for_writing()  # ...before anything is written
  if jax.process_index() == 0:
    save_config(config, workdir, trainer.ckpts.latest_step() is not None)
  hint = malloc.hint(jax.default_backend(), malloc.loaded_allocator())
  if hint and jax.process_index() == 0:
    logging.info(hint)
  try:
    return trainer.run()
  finally:
    trainer.ckpts.wait()


def evaluate_checkpoint(config, workdir: str, step: int | None = None):
  """Loads a checkpoint (latest by default) and reports every prefix on the test split."""
  check_sources(config, workdir)
  check_workdir(config, workdir)
  trainer = Trainer(config, workdir, create=False)
  steps_saved = trainer.ckpts.all_steps()
  if not steps_saved:
    raise FileNotFoundError(f'No checkpoint in {trainer.ckpts.directory}: train first with '
                            f'--mode=train, or pass the --workdir of a trained run.')
  step = steps_saved[-1] if step is None else step
  if step not in steps_saved:
    raise ValueError(f'No checkpoint for step {step} in {trainer.ckpts.directory}; saved '
                     f'steps: {sorted(steps_saved)}.')
  state, stage = trainer.restore(step)
  return report(trainer, stage, state, f'eval_step{step}')
