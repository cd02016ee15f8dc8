"""Training and evaluation loops: stages, checkpoints, resume, validation, reports.

Every mode runs as a sequence of stages (one stage unless `stagewise`). Stage s trains its
model for `steps_per_stage` minibatches; the global step counts minibatches over all stages,
and batch i of a stage is a pure function of (seed, stage, i), so a restored step is all
that exact resume needs. A stagewise stage ends with a checkpoint in workdir/stages that the
next stage restores and extends with fresh branches.
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from paraformer_jax import (checkpoint, evaluation, expand, finetune, flops, input_pipeline,
                            malloc, optim, replay, reporting, run_checks, run_state, sharding,
                            steps, storage, telemetry)
from paraformer_jax.preemption import Interrupted, Preemption, any_process
from paraformer_jax.run_state import StagePlan, StateMaker


class Diverged(FloatingPointError):
  """A non-finite loss or gradient norm: the run stopped without saving it."""


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
    run_checks.check_config(config, self.mesh)
    # Expansion: (branches, classes) of the run whose model is kept inside this one.
    self.source = (expand.source_layout(config.expand_from, config.data.num_classes)
                   if config.expand_from else (0, 0))
    if config.init_from:
      finetune.pretrained_step(config.init_from)
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
    run_checks.check_profile_steps(config.profile_steps,
                                   self.plan.num_stages * self.plan.steps_per_stage)
    self.tx = optim.make_tx(config.training, self.plan.steps_per_stage,
                            self.plan.warmup_steps)
    image_size = config.data.image_size
    self.states = StateMaker(config, self.plan, self.tx, self.mesh,
                             (image_size, image_size, self.channels))
    run_checks.check_memory(config, self.states.abstract(self.plan.num_stages - 1), self.mesh)
    self._open_checkpoints(create)
    # uint8 host batches -> the model's input, on device (input_pipeline.finish).
    self._finish = jax.jit(functools.partial(input_pipeline.finish, mean=d.mean, std=d.std,
                                             num_classes=d.num_classes))
    self.evaluate = evaluation.Evaluator(config, self.mesh, self.shard, self.device_batch)

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
    storage.make_writable_dir(self.workdir, '--workdir')
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
    data = self.stage_batches(stage, int(state.step) - stage * self.plan.steps_per_stage)
    try:
      return StageLoop(self, stage, writer, preemption).run(state, self.stage_step(stage), data)
    finally:
      data.close()  # stops the worker processes

  def stage_step(self, stage):
    """The jitted training step of `stage`."""
    t = self.config.training
    return steps.make_train_step(self.plan.model(stage), self.mesh, self.tx, t.mode,
                                 self.plan.frozen_keys(stage), t.clip_norm, t.label_smoothing,
                                 t.grad_clip_norm)

  def stage_batches(self, stage, start: int):
    """This process's host batches of `stage` from its step `start` (close() it after)."""
    config = self.config
    batches = input_pipeline.train_batches(self.train_source, config.data,
                                           config.training.batch_size,
                                           run_state.data_seed(config.seed, stage), self.shard)
    return input_pipeline.iterate(batches, start, config.workers)

  def run(self):
    """Trains every remaining stage and reports. On SIGTERM or Ctrl-C it saves after the
    current step and raises Interrupted."""
    writer = None
    try:
      with Preemption() as preemption:
        preemption.at_rest = True  # until the first step: a signal stops at once
        resumed = self.restore_latest_intact()  # before anything is written
        writer = reporting.MetricWriter(self.workdir)
        state = self._train_stages(resumed, writer, preemption)
      self.ckpts.wait()
      results = evaluation.report(self, self.plan.num_stages - 1, state, 'final')
      if self.config.expand_from:
        results['forgetting'] = expand.forgetting(self, state)
      return results
    finally:
      if writer is not None:
        writer.close()

  def restore_latest_intact(self):
    """(state, stage) of the newest checkpoint that reads back as written, or None when there
    is none. A damaged one is moved aside (damaged-STEP, never deleted) with a warning;
    when every one was damaged, the run stops (the same command then starts it over)."""
    moved = []
    while (latest := self.ckpts.agreed_latest_step()) is not None:
      try:
        state, layout = self.restore_agreed(latest)
      except checkpoint.DamagedCheckpoint as e:
        aside = self.ckpts.move_aside(latest)
        moved.append(str(aside))
        logging.warning('%s. Moved it to %s; trying the one before it.', e, aside)
        continue
      logging.info('Resuming from step %d (stage %d) in %s', latest, layout,
                   self.ckpts.directory)
      return state, layout
    if moved:
      raise FileNotFoundError(
          f'No intact checkpoint is left in {self.ckpts.directory}: the damaged ones are '
          f'moved to {", ".join(moved)}. Run the same command again to start the run over.')
    return None

  def restore_agreed(self, step):
    """restore(step) on every process, or DamagedCheckpoint on every process when any one
    could not read it (a damaged file may be read by one host only)."""
    error = None
    try:
      restored = self.restore(step)
    except checkpoint.DamagedCheckpoint as e:
      error, restored = e, None
    if any_process(int(error is not None))[0]:
      raise error or checkpoint.DamagedCheckpoint(step, self.ckpts.directory,
                                                  'another process could not read it')
    return restored

  def _train_stages(self, resumed, writer, preemption):
    state, layout = resumed or (self.states.initial(), 0)  # layout: the stage state holds
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
        # A run resumed from before the stage's end (its last checkpoint damaged, say) may
        # find that end saved already: the same state (a resume is exact), kept as it is.
        if int(state.step) not in self.stage_ckpts.all_steps():
          self.stage_ckpts.save(int(state.step), state, {'stage': stage})
          self.stage_ckpts.wait()
    return state


class StageLoop:
  """One stage's steps. The host only dispatches: between log steps nothing waits for the
  device (telemetry.py), so the host enqueues the next steps and batches while the device
  runs. At a log step the interval's metrics come to the host, are checked for non-finite
  values and logged with the loop's timing; every save is preceded by that check, so a
  non-finite state is never saved."""

  def __init__(self, trainer, stage, writer, preemption):
    self.trainer, self.stage, self.writer, self.preemption = trainer, stage, writer, preemption
    self.config, self.plan = trainer.config, trainer.plan
    self.model = self.plan.model(stage)
    self.label = f'stage {stage + 1}/{self.plan.num_stages} ' if self.plan.stagewise else ''
    self.offset = stage * self.plan.steps_per_stage
    self.total = self.plan.num_stages * self.plan.steps_per_stage
    self.metrics = telemetry.IntervalMetrics()
    self.profile = telemetry.Profile(self.config.profile_steps, trainer.workdir)
    d, batch = self.config.data, self.config.training.batch_size
    self.step_flops = {p: flops.train_step_flops(
        self.model, d.image_size, trainer.channels, batch, p, self.plan.frozen_keys(stage),
        steps.static_prefixes(self.model, trainer.mesh)) for p in (False, True)}
    self.saved_at = time.monotonic()

  def run(self, state, train_step, data):
    config, plan, trainer = self.config, self.plan, self.trainer
    start = int(state.step) - self.offset
    corrupt = CorruptCount(config.data.max_corrupt_fraction, len(trainer.train_source))
    eval_every = config.eval_every_steps or plan.steps_per_epoch * plan.passes  # lpa: 2
    logging.info('%straining %s: %s trained, %d frozen; steps %d..%d of %d', self.label,
                 config.training.mode, _count(self.model.num_branches, 'branch'),
                 self.model.num_frozen_branches, self.offset + start,
                 self.offset + plan.steps_per_stage, self.total)
    self.clock = clock = telemetry.LoopClock(start, trainer.mesh.devices.flat)
    batches = telemetry.prefetch(data, trainer.device_batch, plan.steps_per_stage - start,
                                 on_host=lambda b: corrupt.add(b['mask']))
    for i in range(start, plan.steps_per_stage):
      done, step = i + 1, self.offset + i + 1  # step: the state's step after this one
      waited = time.perf_counter()
      batch = next(batches)
      clock.waited_for_input(time.perf_counter() - waited)
      lpa_pass = plan.lpa_pass(i)
      state, compiled = self._step(train_step, state, batch, lpa_pass, step)
      if done == plan.steps_per_stage and config.align_head:
        state = state.replace(params=jax.jit(replay.align_head)(state.params))
      clock.tick(done, lpa_pass, self.step_flops[lpa_pass])
      self.preemption.at_rest = False  # a signal now saves this step first
      if compiled:  # the interval starts after the compiling step: its time is the compile's
        clock.restart()
      last = done == plan.steps_per_stage
      log = done % config.log_every_steps == 0 or last
      signum = self.preemption.requested(step)
      save_due = False
      if log:  # every process decides alike, at the same step
        signum, save_due = any_process(signum or self.preemption.signum,
                                                  self._save_due())
      validate = done % eval_every == 0 or last
      if log or validate or save_due or signum:
        self._log(step, corrupt)
      if last:
        self.writer.write(step, {'train_seconds': clock.train_seconds(done - start)})
      if validate:
        trainer.validate_and_save(self.stage, state, self.writer)
      elif save_due or signum:
        trainer.ckpts.save(step, state, {'stage': self.stage})
      if validate or save_due or signum:
        self.saved_at = time.monotonic()
        clock.restart()  # the save's time is not the steps'
      if signum:
        trainer.ckpts.wait()
        logging.warning('Preempted: saved step %d in %s; the same command resumes from it.',
                        step, trainer.ckpts.directory)
        raise Interrupted(signum, step, trainer.ckpts.directory)
    return state

  def _step(self, train_step, state, batch, lpa_pass, step):
    program = 'LPA pass step' if lpa_pass else 'training step'
    first = self.clock.first_call(lpa_pass)
    if first:  # the paper's LPA pass step compiles ~45 s on a 2-core CPU
      logging.info('%scompiling the %s (first call)...', self.label, program)
      called = time.perf_counter()
    self.profile.before(step)
    state, metrics = train_step(state, batch, lpa_pass=lpa_pass)
    self.metrics.add(step, metrics)
    self.profile.after(step, state)
    if first:  # its time is the compile's: wait for it, and time the steps after it
      telemetry.fetch(metrics)
      logging.info('%scompiled the %s and ran its first call in %.1f s', self.label, program,
                   time.perf_counter() - called)
    return state, first

  def _save_due(self) -> bool:
    minutes = self.config.checkpoint_every_minutes
    return bool(minutes) and time.monotonic() - self.saved_at >= 60 * minutes

  def _log(self, step, corrupt):
    """Fetches the metrics since the last log step (raising on a non-finite one) and writes
    them with the loop's timing: a progress line, metrics.jsonl, TensorBoard."""
    ckpts = self.trainer.ckpts
    try:
      steps_logged, metrics = self.metrics.take()
    except FloatingPointError as e:
      lr = self.config.training.learning_rate
      fix = (f'lower the learning rate (config.training.learning_rate={lr:g}, e.g. '
             f'--config.training.learning_rate={lr / 10:g}) or check the data')
      latest = ckpts.latest_step()
      kept = (f'The last good checkpoint is step {latest} in {ckpts.directory}; {fix}, then '
              f'rerun the same command to resume from it.' if latest is not None else
              f'No checkpoint was saved yet; {fix}, then rerun the same command.')
      raise Diverged(f'Training diverged: {e}. {kept}') from None
    corrupt.check()
    if metrics is None:
      return
    timing = self.clock.interval(self.config.training.batch_size, self.config.model.dtype)
    eta = self.clock.eta(self.total - step)
    logging.info(reporting.progress_line(self.label, step, self.total, metrics, timing, eta))
    self.writer.write(step, {**metrics, **(timing or {}), 'stage': self.stage})


def _count(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 'es' if noun.endswith('ch') else 's')


def write_params_workdir(config, out, params, step: int, written_by: str,
                         val_accuracy: float | None = None):
  """A new workdir (see run_checks.check_new_workdir) holding `params` as its checkpoint at `step`:
  config.json and a self-contained config.py (for --config=OUT/config.py), so that
  --mode=eval, compress and config.init_from take it like a trained run's. The checkpoint's
  metric is `val_accuracy`, or the model's accuracy on the validation split when not given."""
  out = storage.path(out)
  several = jax.process_count() > 1
  if several:  # every process has checked that `out` is new before any makes it
    multihost_utils.sync_global_devices(f'checked {out}')
  if jax.process_index() == 0:
    out.mkdir(parents=True)
    as_json = config.to_json_best_effort(indent=1)
    storage.write_atomic(out / 'config.json', as_json)
    storage.write_atomic(out / 'config.py', run_checks.config_file(as_json, written_by))
  if several:
    multihost_utils.sync_global_devices(f'made {out}')
  writer = Trainer(config, out)
  state = writer.states.initial()
  state = state.replace(  # global arrays (on several processes Orbax saves no other kind)
      step=jax.make_array_from_callback((), state.step.sharding, lambda _: np.int32(step)),
      params=sharding.params_to_mesh(params, writer.mesh))
  if val_accuracy is None:
    model = writer.plan.model(0)
    val_accuracy = writer.evaluate(model, state.params, writer.val_source)[
        'prefix_accuracy'][-1]
  writer.ckpts.save(step, state, {'stage': 0}, metrics={'val_accuracy': val_accuracy})
  writer.ckpts.wait()
  return val_accuracy


def train_and_evaluate(config, workdir: str):
  """Trains (resuming from workdir if it holds checkpoints), then reports test accuracy."""
  run_checks.check_sources(config, workdir)
  run_checks.check_workdir(config, workdir)
  trainer = Trainer(config, workdir, create=False)  # every setting and input checked...
  trainer.open_for_writing()  # ...before anything is written
  if jax.process_index() == 0:
    run_checks.save_config(config, workdir, trainer.ckpts.latest_step() is not None)
  hint = malloc.hint(jax.default_backend(), malloc.loaded_allocator())
  if hint and jax.process_index() == 0:
    logging.info(hint)
  try:
    return trainer.run()
  finally:
    trainer.ckpts.wait()


def evaluate_checkpoint(config, workdir: str, step: int | None = None):
  """Loads a checkpoint (latest by default) and reports every prefix on the test split."""
  run_checks.check_sources(config, workdir)
  run_checks.check_workdir(config, workdir)
  trainer = Trainer(config, workdir, create=False)
  latest = trainer.ckpts.agreed_latest_step()
  steps_saved = trainer.ckpts.all_steps()
  if latest is None:
    raise FileNotFoundError(f'No checkpoint in {trainer.ckpts.directory}: train first with '
                            f'--mode=train, or pass the --workdir of a trained run.')
  step = latest if step is None else step
  if step not in steps_saved:
    raise ValueError(f'No checkpoint for step {step} in {trainer.ckpts.directory}; saved '
                     f'steps: {sorted(steps_saved)}.')
  try:
    state, stage = trainer.restore_agreed(step)
  except checkpoint.DamagedCheckpoint as e:
    intact = [s for s in sorted(steps_saved) if s != step and _reads(trainer, s)]
    raise checkpoint.DamagedCheckpoint(
        step, trainer.ckpts.directory,
        f'{str(e).split(": ", 1)[-1]}. Intact steps: {intact or "none"}'
        + (f'; evaluate one with --step={intact[-1]}' if intact else '')
        + '. Training with the same command moves it aside and resumes from the newest '
        'intact one') from None
  return evaluation.report(trainer, stage, state, f'eval_step{step}')


def _reads(trainer, step) -> bool:
  try:
    trainer.restore_agreed(step)
    return True
  except checkpoint.DamagedCheckpoint:
    return False
