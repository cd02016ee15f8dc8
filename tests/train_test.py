"""The trainer: end to end through main, resume, stagewise freezing, lpa, exact evaluation."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_test import LIBTPU_NOISE
from conftest import SMALL, preempt_at

from configs import tiny
from paraformer_jax import (checkpoint, input_pipeline, malloc, optim, run_checks, sharding,
                            steps, train)
from paraformer_jax.model import ParaFormer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def tiny_config(data_dir, **training):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.eval_every_steps = 5
  config.training.update(training)
  return config


def restore_latest(config, workdir):
  trainer = train.Trainer(config, workdir)
  return trainer.restore(trainer.ckpts.latest_step())[0]


def trees_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


@pytest.mark.slow
def test_main_trains_then_evaluates_like_a_user(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  base = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.training.epochs=1']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  env.pop('LD_PRELOAD', None)  # glibc's malloc: the run suggests tcmalloc
  out = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, check=True)
  assert malloc.HINT in out.stderr
  final = json.load(open(os.path.join(workdir, 'final_prefix_accuracy.json')))
  assert final['count'] == 360 and final['step'] == 13  # 1,257 // 96 steps
  assert [r['branches'] for r in final['prefixes']] == [1, 2, 3, 4]
  assert 'accuracy of the first k branches' in out.stdout
  assert os.path.getsize(os.path.join(workdir, 'final_prefix_accuracy.png')) > 1000
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  logged = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert {'loss', 'accuracy', 'images_per_s'} <= set(logged[0])
  assert any('val_accuracy' in m for m in logged)

  out = subprocess.run(base + ['--mode=eval'], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True)
  evaluated = json.load(open(os.path.join(workdir, 'eval_step13_prefix_accuracy.json')))
  # The latest checkpoint holds the final parameters: the same accuracies.
  assert evaluated['prefixes'] == final['prefixes']
  assert 'eval_step13' in out.stdout

  bad = subprocess.run(base[:4] + [f'--workdir={tmp_path / "empty"}', base[5], '--mode=eval'],
                       cwd=REPO, env=env, capture_output=True, text=True)
  assert bad.returncode != 0 and 'No checkpoint in' in bad.stderr
  assert not os.path.exists(tmp_path / 'empty')  # evaluation creates nothing
  assert not os.path.exists(os.path.join(workdir, 'stages'))  # not a stagewise run

  # Its only checkpoint damaged: evaluation says so in one line (exit 2); training moves it
  # aside and stops, as none is left; the same command again starts over, to the same end.
  checkpoints = os.path.join(workdir, 'checkpoints')
  with open(_largest_file(os.path.join(checkpoints, '13')), 'r+b') as f:
    f.truncate(100)
  out = subprocess.run(base + ['--mode=eval'], cwd=REPO, env=env, capture_output=True,
                       text=True)
  ours = [l for l in out.stderr.strip().splitlines() if not LIBTPU_NOISE.search(l)]
  assert out.returncode == 2 and len(ours) == 1, out.stderr[-3000:]
  assert ours[0].startswith(f'error: checkpoint step 13 in {checkpoints} is damaged: '
                            f'{checkpoints}/13/'), ours
  assert ours[0].endswith('Intact steps: none. Training with the same command moves it aside '
                          'and resumes from the newest intact one'), ours
  out = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f'error: No intact checkpoint is left in {checkpoints}: the damaged ones are moved to '
      f'{checkpoints}/damaged-13. Run the same command again to start the run over.')
  assert 'Traceback' not in out.stderr
  subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, check=True)
  again = json.load(open(os.path.join(workdir, 'final_prefix_accuracy.json')))
  assert again['prefixes'] == final['prefixes']
  assert sorted(os.listdir(checkpoints)) == ['13', 'damaged-13']


@pytest.mark.slow
def test_divergence_is_one_line_with_exit_3(data_dir, tmp_path):
  """docs/faults.md: a non-finite loss stops the run with exit status 3."""
  cmd = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/tiny.py',
         f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={data_dir}',
         '--config.training.learning_rate=1e6']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 3, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      r"error: Training diverged: non-finite training metrics \{.*'loss': nan.*\} at step \d+ "
      r'\(in the interval of steps 1\.\.5\)\. No checkpoint was saved yet; lower the learning '
      r'rate \(config\.training\.learning_rate=1e\+06, e\.g\. '
      r'--config\.training\.learning_rate=100000\) or check the data, then rerun the same '
      r'command\.', last), last
  assert 'Traceback' not in out.stderr


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """A tiny run of 13 steps, validated and saved every 5, keeping the last 1 plus the best."""
  config = tiny_config(data_dir, epochs=1)
  config.keep_checkpoints = 1
  workdir = str(tmp_path_factory.mktemp('straight'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _interrupting(after, error=KeyboardInterrupt, poison=False):
  """An input_pipeline.iterate that stops (or yields a batch of NaN images) after `after`
  batches."""
  real_iterate = input_pipeline.iterate

  def iterate(batches, start, workers=0):
    if len(batches) < 10**9:  # evaluation's finite batches pass through untouched
      return real_iterate(batches, start, workers)
    return interrupted(real_iterate(batches, start, workers))

  def interrupted(it):
    for _ in range(after):
      yield next(it)
    if not poison:
      raise error
    batch = next(it)  # uint8 images cannot hold NaN: a NaN mixing weight makes them NaN
    rows = len(batch['label'])
    yield {**batch, 'mix_lam': np.full(rows, np.nan, np.float32),
           'mix_box': np.zeros((rows, 4), np.int32)}
    yield from it  # the loop finds out at its next log step
  return iterate


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(straight_run, tmp_path, monkeypatch):
  config, straight = straight_run
  want = restore_latest(config, straight)
  workdir = str(tmp_path / 'resumed')
  with monkeypatch.context() as m:
    m.setattr(input_pipeline, 'iterate', _interrupting(7))  # the 8th batch never arrives
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, workdir)
  assert train.Trainer(config, workdir).ckpts.latest_step() == 5  # the last save before it
  train.train_and_evaluate(config, workdir)
  got = restore_latest(config, workdir)
  assert int(got.step) == int(want.step) == 13
  assert trees_equal(got.params, want.params)
  assert trees_equal(got.opt_state, want.opt_state)


@pytest.mark.slow
def test_keeps_the_last_checkpoint_plus_the_best(straight_run):
  config, workdir = straight_run
  logged = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  val = {m['step']: m['val_accuracy'] for m in logged if 'val_accuracy' in m}
  assert sorted(val) == [5, 10, 13]
  best = max(val.values())
  ckpts = train.Trainer(config, workdir).ckpts  # a new manager: what is on disk
  kept = ckpts.all_steps()
  assert 13 in kept and len(kept) <= 2
  assert max(val[s] for s in kept) == best
  assert val[ckpts.best_step()] == best  # the metrics were written with the checkpoints


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path,
                                                                  monkeypatch):
  config = tiny_config(data_dir, epochs=1)
  workdir = str(tmp_path / 'nan')
  monkeypatch.setattr(input_pipeline, 'iterate', _interrupting(6, poison=True))
  # Found at the next log step (10), before its save: named by its step and interval.
  with pytest.raises(FloatingPointError, match=r'at step 7 \(in the interval of steps 6\.\.10\)'
                                               r'.*last good checkpoint is step 5'):
    train.train_and_evaluate(config, workdir)
  trainer = train.Trainer(config, workdir)
  assert trainer.ckpts.all_steps() == [5]
  state, _ = trainer.restore(5)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))


@pytest.mark.slow
@pytest.mark.parametrize('save', ['validation', 'signal'])
def test_a_save_between_log_steps_never_saves_a_non_finite_state(data_dir, tmp_path,
                                                                 monkeypatch, save):
  """Step 7 is non-finite and a save falls on it, before the log step (10): the run stops
  at step 7 with nothing saved, naming no checkpoint and what to change."""
  config = tiny_config(data_dir, epochs=1)
  config.eval_every_steps = 7 if save == 'validation' else 13
  workdir = str(tmp_path / save)
  monkeypatch.setattr(input_pipeline, 'iterate', _interrupting(6, poison=True))
  if save == 'signal':  # SIGTERM arrives during step 7
    monkeypatch.setattr(train.Preemption, 'requested',
                        lambda self, step: signal.SIGTERM if step == 7 else 0)
  with pytest.raises(FloatingPointError, match=r'at step 7 \(in the interval of steps 6\.\.7\)'
                                               r'\. No checkpoint was saved yet; lower the '
                                               r'learning rate'):
    train.train_and_evaluate(config, workdir)
  assert train.Trainer(config, workdir).ckpts.all_steps() == []


def test_config_json_is_never_seen_half_written(data_dir, tmp_path):
  """Multi-host: process 0 writes config.json while the others run check_workdir on it."""
  config = tiny_config(data_dir)
  workdir = str(tmp_path)
  run_checks.save_config(config, workdir, has_checkpoints=False)
  done = threading.Event()

  def keep_writing():
    for _ in range(200):
      run_checks.save_config(config, workdir, has_checkpoints=False)
    done.set()
  writer = threading.Thread(target=keep_writing)
  writer.start()
  checks = 0
  while not done.is_set():
    run_checks.check_workdir(config, workdir)  # raised JSONDecodeError when written in place
    checks += 1
  writer.join()
  assert checks > 0


def test_a_workdir_of_another_run_is_refused_and_kept(straight_run):
  config, workdir = straight_run
  other = tiny_config(config.data.data_dir, epochs=1)
  other.model.num_branches = 8
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(ValueError, match=r'model.num_branches: 4 in the workdir, 8 now'):
    train.train_and_evaluate(other, workdir)
  with pytest.raises(ValueError, match=r'model.num_branches: 4 in the workdir, 8 now'):
    train.evaluate_checkpoint(other, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before
  # The examples an epoch is made of define the run; with the cosine, so does its warmup.
  split = tiny_config(config.data.data_dir, epochs=1)
  split.data.train_split = 'train[:50%]'
  with pytest.raises(ValueError, match=r"data.train_split: 'train' in the workdir, "
                                       r"'train\[:50%\]' now"):
    run_checks.check_workdir(split, workdir)
  warmup = tiny_config(config.data.data_dir, epochs=1)
  warmup.training.warmup_epochs = 0.5
  run_checks.check_workdir(warmup, workdir)  # a constant learning rate has no warmup
  warmup.training.schedule = 'cosine'
  with pytest.raises(ValueError, match=r'training.warmup_epochs: 0.0 in the workdir, 0.5 now'):
    run_checks.check_workdir(warmup, workdir)
  # A setting that cannot work is refused before anything is written.
  bad = tiny_config(config.data.data_dir, epochs=1, learning_rate=-1e-3)
  with pytest.raises(ValueError, match=r'config.training.learning_rate=-0.001: use a number > 0'):
    train.train_and_evaluate(bad, workdir)
  # Rerunning the finished run with a setting the checkpoints were not made with reports
  # again but leaves config.json describing them.
  changed = tiny_config(config.data.data_dir, epochs=1, learning_rate=0.123)
  train.train_and_evaluate(changed, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before
  # Settings that leave the parameters alone are accepted.
  same = tiny_config(config.data.data_dir, epochs=1)
  same.model.branch_strategy = 'vmap'
  run_checks.check_workdir(same, workdir)


def test_a_checkpoint_that_does_not_fit_the_config_says_which_parameters(straight_run):
  config, workdir = straight_run
  other = tiny_config(config.data.data_dir, epochs=1)
  other.model.num_branches = 8
  trainer = train.Trainer(other, workdir)
  with pytest.raises(ValueError, match=r"(?s)the checkpoint has \[4\] trained branches, the config "
                                       r"model.num_branches=8.*\['branches'\]"):
    trainer.restore(trainer.ckpts.latest_step())


@pytest.mark.slow
def test_stagewise_freezes_and_extends(data_dir, tmp_path):
  config = tiny_config(data_dir, mode='stagewise', branches_per_stage=2, epochs=1)
  config.mesh.branch = 2  # each stage's 2 branches split over 2 devices
  config.keep_checkpoints = 10
  workdir = str(tmp_path / 'stagewise')
  train.train_and_evaluate(config, workdir)
  trainer = train.Trainer(config, workdir)
  assert trainer.stage_ckpts.all_steps() == [13, 26]
  stage0, s0 = trainer.restore(13, trainer.stage_ckpts)
  stage1, s1 = trainer.restore(26, trainer.stage_ckpts)
  assert (s0, s1) == (0, 1)
  # Frozen: bit-identical after a stage of training; the embedding too (frozen by default).
  assert trees_equal(stage1.params['frozen_branches'], stage0.params['branches'])
  assert trees_equal(stage1.params['embed'], stage0.params['embed'])
  assert not trees_equal(stage1.params['head'], stage0.params['head'])
  # The optimizer holds state for the trained branches and the head only.
  mu = stage1.opt_state['shared'][0].mu
  assert set(mu) == {'head'}
  assert {a.shape[0] for a in jax.tree.leaves(stage1.opt_state['branches'])} == {2}
  # Extending from the stage checkpoint restores the earlier branches exactly.
  extended = trainer.states.extend(stage0, 1)
  assert trees_equal(extended.params['frozen_branches'], stage0.params['branches'])
  assert not trees_equal(extended.params['branches'], stage0.params['branches'])
  assert int(extended.step) == 13
  assert extended.params['branches']['branch']['block0']['mlp']['fc1']['kernel'].sharding.spec[
      0] == 'branch'

  # Killed at the stage boundary, before the stage checkpoint was written: the restart
  # extends the state of step 13 itself and ends exactly where the first run ended.
  import shutil
  for step in trainer.ckpts.all_steps():
    if step > 13:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  shutil.rmtree(os.path.join(workdir, 'stages'))
  train.train_and_evaluate(config, workdir)
  again, layout = train.Trainer(config, workdir).restore(26)
  assert layout == 1
  assert trees_equal(again.params, stage1.params)


def _fresh_state(params, tx):
  """A TrainState over copies of params (train steps donate their input state)."""
  params = jax.tree.map(jnp.copy, params)
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optim.init(tx, params), rng=jax.random.PRNGKey(0))


def _mesh1():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def test_a_training_step_with_dropout_is_the_same_on_every_mesh(images):
  """Dropout masks follow the global example and branch, not the device layout."""
  model = ParaFormer(num_branches=8, branch_depth=1, dropout=0.1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  tx = optax.sgd(1.0)  # new params = params - gradients (Adam's first step, ~ -lr * sign(g),
  # would turn f32 reordering noise in near-zero gradients into lr-sized differences)
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  clean = steps.cross_entropy(model.apply({'params': params}, images), batch['label'])
  results = {}
  for data, branch in [(1, 1), (1, 8), (2, 4), (8, 1)]:
    mesh = _mesh1() if data * branch == 1 else sharding.make_mesh(data, branch)
    step = steps.make_train_step(model, mesh, tx, 'joint')
    state, metrics = step(_fresh_state(params, tx), sharding.global_batch(mesh, batch))
    results[data, branch] = jax.device_get((state.params, metrics['loss']))
  want_params, want_loss = results[1, 1]
  assert abs(float(want_loss) - float(clean)) > 1e-4  # dropout was on
  for mesh, (got_params, got_loss) in results.items():
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=str(mesh))
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=str(mesh))


def test_lpa_counts_one_update_per_prefix_and_one_per_full_step(images):
  model = ParaFormer(num_branches=4, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  tx = optax.adam(1e-3)
  state = _fresh_state(params, tx)
  step = steps.make_train_step(model, _mesh1(), tx, 'lpa')
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  state, _ = step(state, batch, lpa_pass=True)
  # Branch i takes part in updates i..L: counts L, L-1, ..., 1; shared parts in all L.
  np.testing.assert_array_equal(state.opt_state['branches'][0].count, [4, 3, 2, 1])
  assert int(state.opt_state['shared'][0].count) == 4
  state, _ = step(state, batch, lpa_pass=False)
  np.testing.assert_array_equal(state.opt_state['branches'][0].count, [5, 4, 3, 2])
  assert int(state.opt_state['shared'][0].count) == 5 and int(state.step) == 2


def _displacement(a, b):
  return float(optax.global_norm(jax.tree.map(lambda x, y: x - y, a, b)))


def test_grad_clip_norm_bounds_every_update_of_every_mode(images):
  """SGD(1): an update moves the parameters by the (clipped) gradient, so the distance moved
  is the clipped norm: training.grad_clip_norm in every mode, and in lpa's prefix updates
  beside their own clip_norm (the smaller bound holds)."""
  model = ParaFormer(num_branches=2, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  tx = optax.sgd(1.0)
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  bound = 1e-3
  free = steps.make_train_step(model, _mesh1(), tx, 'joint')
  state, metrics = free(_fresh_state(params, tx), batch)
  moved = _displacement(state.params, params)
  np.testing.assert_allclose(moved, float(metrics['grad_norm']), rtol=1e-4)
  assert moved > 100 * bound  # unclipped, the step is far longer than the bound
  for mode, lpa_pass in (('joint', False), ('lpa_fused', False), ('lpa', False),
                         ('lpa', True)):
    step = steps.make_train_step(model, _mesh1(), tx, mode, clip_norm=1.0,
                                 grad_clip_norm=bound)
    state, _ = step(_fresh_state(params, tx), batch, lpa_pass=lpa_pass)
    moved = _displacement(state.params, params)
    if lpa_pass:  # two prefix updates of at most `bound` each
      assert bound < moved <= 2 * bound * (1 + 1e-4), (mode, moved)
    else:
      np.testing.assert_allclose(moved, bound, rtol=1e-4, err_msg=mode)


def test_padding_rows_count_for_nothing_even_when_classified_correctly(images):
  """A model that predicts class 0 everywhere, on a batch of 3 examples (labels 0, 3, 0)
  padded to 8 with rows of label 0: every prefix gets 2 right out of 3, not 7 out of 8."""
  model = ParaFormer(num_branches=2, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  params['head']['out']['bias'] = params['head']['out']['bias'].at[0].set(1e4)
  mask = jnp.array([1, 1, 1, 0, 0, 0, 0, 0], jnp.float32)
  batch = {'image': images, 'label': jnp.array([0, 3, 0, 0, 0, 0, 0, 0]), 'mask': mask}
  sums = steps.make_eval_step(model, _mesh1())(params, batch)
  np.testing.assert_array_equal(sums['correct'], [2, 2])
  assert float(sums['count']) == 3
  # The loss of the padding rows (label 0, predicted with certainty) is 0 anyway; the 3
  # examples' loss is that of the one wrong row (label 3).
  logits = model.apply({'params': params}, images[1:2])
  want = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([3]))[0])
  np.testing.assert_allclose(float(sums['loss_sum']), want, rtol=1e-4)


def test_lpa_learning_rate_is_a_function_of_the_minibatch_step(images):
  """Warmup from 0: every one of the L + 1 updates of minibatch 0 uses lr(0) = 0, for
  branches and shared parameters alike (optax's own count reached lr > 0 within the pass)."""
  import ml_collections
  model = ParaFormer(num_branches=4, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  training = ml_collections.ConfigDict(dict(learning_rate=1e-3, schedule='cosine',
                                            optimizer='adamw', weight_decay=0.1))
  tx = optim.make_tx(training, steps_per_stage=10, warmup_steps=2)  # lr: 0, 5e-4, 1e-3, ...
  step = steps.make_train_step(model, _mesh1(), tx, 'lpa')
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  state, _ = step(_fresh_state(params, tx), batch, lpa_pass=True)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  before = jax.device_get(state.params)
  state, _ = step(state, batch, lpa_pass=False)  # minibatch 1: lr 5e-4 for everything
  for got, was in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
    assert 0 < np.abs(got - was).max() < 3 * 5e-4  # moved, by about lr(1) (Adam: ~lr)


@pytest.mark.parametrize('strategy', ['auto', 'unrolled'])  # auto: 'vmap' at this size
def test_lpa_pass_of_prefix_models_equals_the_all_prefix_loop(images, strategy):
  """One device: update i runs a model of branches 1..i only. Branches sharded over 2
  devices: a loop over the full model's prefix logits. With dropout on, both must give the
  same parameters (same masks: they follow the global branch index)."""
  model = ParaFormer(num_branches=4, branch_depth=1, dropout=0.1, branch_strategy=strategy,
                     **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  tx = optax.sgd(0.1)  # Adam would turn f32 reordering noise in tiny gradients into lr steps
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  got = {}
  for name, mesh in (('prefix models', _mesh1()),
                     ('loop', sharding.make_mesh(1, 2, devices=jax.devices()[:2]))):
    step = steps.make_train_step(model, mesh, tx, 'lpa')
    state, _ = step(_fresh_state(params, tx), sharding.global_batch(mesh, batch),
                    lpa_pass=True)
    got[name] = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(got['prefix models']), jax.tree.leaves(got['loop'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_lpa_updates_equal_hand_computed_adam_steps(images):
  """Two branches: update 1 on the branch-1 loss, update 2 on the full loss, by hand."""
  model = ParaFormer(num_branches=2, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  labels = jnp.arange(8) % 10
  lr = 1e-3
  # eps 1e-6, not 1e-8: Adam's first step, lr * g / (|g| + eps), turns f32 reordering noise
  # in near-zero gradients into lr-sized differences; the prefix models sum in another order.
  eps = 1e-6
  tx = optax.adam(lr, eps=eps)
  state = _fresh_state(params, tx)
  got, _ = steps.make_train_step(model, _mesh1(), tx, 'lpa')(state, {'image': images,
                                                                     'label': labels},
                                                             lpa_pass=True)

  def prefix_grads(p, k):
    def loss(p):
      logits = model.apply({'params': p}, images, method=ParaFormer.prefix_logits)[k - 1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    g = jax.grad(loss)(p)
    norm = optax.global_norm(g)
    return jax.tree.map(lambda x: x * min(1.0, 1.0 / (float(norm) + 1e-6)), g)

  slot = lambda p, i: jax.tree.map(lambda a: a[i], p['branches'])
  # Update 1: branch 1, embed and head take a first Adam step; branch 2 is untouched.
  g1 = prefix_grads(params, 1)
  first = lambda p, g: jax.tree.map(lambda x, gx: x - lr * gx / (jnp.abs(gx) + eps), p, g)
  p1 = {'embed': first(params['embed'], g1['embed']), 'head': first(params['head'], g1['head'])}
  b1 = first(slot(params, 0), slot(g1, 0))
  # Update 2, by optax on separate states: shared parts and branch 1 take their second step,
  # branch 2 its first.
  current = {**p1, 'branches': jax.tree.map(lambda a, b: jnp.stack([a, b]), b1,
                                            slot(params, 1))}
  g2 = prefix_grads(current, 2)
  second_tx, first_tx = optax.adam(lr, eps=eps), optax.adam(lr, eps=eps)
  s = second_tx.init({'embed': params['embed'], 'head': params['head'], 'b': slot(params, 0)})
  _, s = second_tx.update({'embed': g1['embed'], 'head': g1['head'], 'b': slot(g1, 0)}, s)
  u, _ = second_tx.update({'embed': g2['embed'], 'head': g2['head'], 'b': slot(g2, 0)}, s)
  u2, _ = first_tx.update(slot(g2, 1), first_tx.init(slot(params, 1)))
  want = {'embed': optax.apply_updates(p1['embed'], u['embed']),
          'head': optax.apply_updates(p1['head'], u['head']),
          'branches': jax.tree.map(lambda a, b: jnp.stack([a, b]),
                                   optax.apply_updates(b1, u['b']),
                                   optax.apply_updates(slot(params, 1), u2))}
  # Within 1% of one step (lr): a first Adam step g / (|g| + eps) is ill-conditioned where
  # |g| ~ eps; a wrong mask or order would be off by a whole step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * lr),
               got.params, want)
  # And the second branch did move (by one first step, not zero).
  assert np.abs(np.asarray(jax.tree.leaves(got.params['branches'])[0][1]
                           - jax.tree.leaves(params['branches'])[0][1])).max() > 0.5 * lr


def test_lpa_pass_clips_the_gradient_and_the_full_pass_does_not(images):
  """With one branch both passes differentiate the same loss; plain SGD shows the scale."""
  model = ParaFormer(num_branches=1, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  # A scaled-up head makes the gradient norm well above clip_norm=1.
  params['head']['out']['kernel'] = params['head']['out']['kernel'] * 30
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  lr = 0.1
  tx = optax.sgd(lr)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, images), batch['label']).mean()
  grads = jax.grad(loss)(params)
  norm = float(optax.global_norm(grads))
  assert norm > 2
  step = steps.make_train_step(model, _mesh1(), tx, 'lpa', clip_norm=1.0)
  moved = {}
  for lpa_pass in (True, False):
    state, metrics = step(_fresh_state(params, tx), batch, lpa_pass=lpa_pass)
    np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-4)
    moved[lpa_pass] = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params,
                                   params)
  # The moves are differences of f32 parameters: exact to about 1e-7 * |param| (1e-6 here),
  # far below the factor 1/norm < 0.5 between the clipped and the unclipped step.
  jax.tree.map(lambda m, g: np.testing.assert_allclose(m, -lr * g / norm, rtol=1e-2,
                                                       atol=1e-6), moved[True], grads)
  jax.tree.map(lambda m, g: np.testing.assert_allclose(m, -lr * g, rtol=1e-2, atol=1e-6),
               moved[False], grads)
  big = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  assert lr * big * (1 - 1 / norm) > 100 * 1e-6  # the two differ far beyond the tolerance


@pytest.mark.slow
def test_lpa_through_the_trainer_alternates_whole_passes(data_dir, tmp_path, monkeypatch,
                                                         caplog):
  """An lpa epoch: one LPA pass over the split, then one full pass; validation after both.
  Each of the two programs says once that it compiles, before its first call."""
  config = tiny_config(data_dir, epochs=1, mode='lpa')
  config.eval_every_steps = 0  # every epoch
  passes, validated = [], []
  real_make, real_validate = steps.make_train_step, train.Trainer.validate_and_save

  def make_train_step(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def recording(state, batch, lpa_pass=False):
      passes.append(lpa_pass)
      return step(state, batch, lpa_pass=lpa_pass)
    return recording

  def validate(self, stage, state, writer):
    validated.append(int(state.step))
    return real_validate(self, stage, state, writer)
  monkeypatch.setattr(steps, 'make_train_step', make_train_step)
  monkeypatch.setattr(train.Trainer, 'validate_and_save', validate)
  with caplog.at_level(logging.INFO, logger='absl'):
    train.train_and_evaluate(config, str(tmp_path / 'lpa'))
  d = config.data
  spe = len(input_pipeline.split_source(d, d.train_split)) // config.training.batch_size
  assert passes == [True] * spe + [False] * spe
  assert validated == [2 * spe]
  compiling = [r.getMessage() for r in caplog.records if 'compil' in r.getMessage()]
  assert [m.split(' (')[0].split(' in ')[0] for m in compiling] == [
      'compiling the LPA pass step', 'compiled the LPA pass step and ran its first call',
      'compiling the training step', 'compiled the training step and ran its first call']


def test_fused_loss_is_the_mean_of_prefix_losses(images):
  model = ParaFormer(num_branches=2, branch_depth=1, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  labels = jnp.arange(8) % 10
  tx = optax.sgd(0.1)
  state = _fresh_state(params, tx)
  _, metrics = steps.make_train_step(model, _mesh1(), tx, 'lpa_fused')(
      state, {'image': images, 'label': labels})
  logits = model.apply({'params': params}, images, method=ParaFormer.prefix_logits)
  want = np.mean([optax.softmax_cross_entropy_with_integer_labels(l, labels).mean()
                  for l in logits])
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)


def test_exact_evaluation_counts_every_example_once(data_dir):
  config = tiny_config(data_dir)  # test split: 360 images, eval batches of 128
  trainer = train.Trainer(config, os.path.join(data_dir, 'unused_workdir'))
  model = trainer.plan.model(0)
  params = trainer.states.initial().params
  source = input_pipeline.get_source('sklearn_digits', 'test', data_dir)
  result = trainer.evaluate(model, params, source)
  assert result['count'] == 360
  # Independently: every test image through the plain model, one at a time in numpy order.
  x = np.stack([(source[i]['image'] / 255 - config.data.mean) / config.data.std
                for i in range(360)]).astype(np.float32)  # 8x8 digits: no resize
  y = np.array([source[i]['label'] for i in range(360)])
  params = jax.device_get(params)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x,
                                            method=ParaFormer.prefix_logits))(params, x)
  want = (np.argmax(logits, -1) == y).mean(-1)
  np.testing.assert_allclose(result['prefix_accuracy'], want, atol=1e-6)


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_the_same_command_resumes(data_dir, tmp_path):
  """SIGINT as SIGTERM (preempt_at: exit status 130 = 128 + SIGINT); the multi-process
  tests send SIGTERM."""
  workdir = str(tmp_path / 'preempted')
  cmd = [sys.executable, '-m', 'paraformer_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.training.epochs=4', '--config.log_every_steps=2']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = preempt_at([proc], 'step 4/52', signal.SIGINT)
  saved = [l for l in lines if 'Preempted: saved step' in l]
  assert len(saved) == 1, ''.join(lines[-30:])
  step = int(saved[0].split('saved step ')[1].split()[0])
  assert lines[-1].strip() == (f'interrupted by SIGINT at step {step}: saved in '
                               f'{workdir}/checkpoints. Resume with the same command.')
  assert not any('Traceback' in l for l in lines)
  assert 4 <= step < 52
  config = tiny_config(data_dir, epochs=4)
  assert train.Trainer(config, workdir).ckpts.latest_step() == step
  assert not os.path.exists(os.path.join(workdir, 'final_prefix_accuracy.json'))

  # A checkpoint left half-written by a kill -9 (Orbax's temporary directory) is ignored.
  os.makedirs(os.path.join(workdir, 'checkpoints', f'{step + 3}.orbax-checkpoint-tmp-1'))
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'Resuming from step {step} (stage 0)' in out.stderr
  assert json.load(open(os.path.join(workdir, 'final_prefix_accuracy.json')))['step'] == 52
  # Bit-identical to the same command never interrupted.
  straight = str(tmp_path / 'straight')
  subprocess.run([a.replace(workdir, straight) for a in cmd], cwd=REPO, env=env, check=True,
                 capture_output=True)
  got, want = (restore_latest(config, w) for w in (workdir, straight))
  assert int(got.step) == int(want.step) == 52
  assert trees_equal(got.params, want.params) and trees_equal(got.opt_state, want.opt_state)


def _largest_file(directory):
  files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(straight_run, tmp_path):
  """Truncated or changed data in the latest checkpoint: --mode=eval names it and exits 2;
  training moves it to damaged-STEP and resumes from the one before it, bit-identically."""
  config, straight = straight_run
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(straight, workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  # One earlier checkpoint (step 5, as the run saved it) beside the latest, 13.
  shutil.rmtree(checkpoints)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(input_pipeline, 'iterate', _interrupting(7))
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, workdir)
  shutil.copytree(os.path.join(straight, 'checkpoints', '13'), os.path.join(checkpoints, '13'))
  tensorboard = sorted(os.listdir(os.path.join(workdir, 'tensorboard')))
  with open(_largest_file(os.path.join(checkpoints, '13', 'state')), 'r+b') as f:
    f.truncate(100)
  # Evaluation only reads: one message naming the step, the file and the intact steps.
  with pytest.raises(checkpoint.DamagedCheckpoint,
                     match=r'checkpoint step 13 in .* is damaged: .*13/state/ holds array '
                           r'.*not valid for value of size 100\. Intact steps: \[5\]; evaluate '
                           r'one with --step=5\.'):
    train.evaluate_checkpoint(config, workdir)
  assert sorted(os.listdir(checkpoints)) == ['13', '5']
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(checkpoints)) == ['13', '5', 'damaged-13']
  got, want = restore_latest(config, workdir), restore_latest(config, straight)
  assert int(got.step) == 13 and trees_equal(got.params, want.params)
  assert trees_equal(got.opt_state, want.opt_state)
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == len(tensorboard) + 1
  # Data that reads but is not what was written (a changed byte of a parameter) is caught by
  # the checksums saved with it; with no intact checkpoint left the run stops, and the same
  # command starts over.
  trainer = train.Trainer(config, workdir)
  state = trainer.restore(13)[0]
  changed = state.replace(params=jax.tree.map(lambda a: a.at[(0,) * a.ndim].add(1.0)
                                              if a.ndim else a, state.params))
  meta = trainer.ckpts.meta(13)
  for step in (5, 13):
    shutil.rmtree(os.path.join(checkpoints, str(step)))
  trainer = train.Trainer(config, workdir)
  trainer.ckpts.save(13, changed, {'stage': 0})
  trainer.ckpts.wait()
  meta_file = os.path.join(checkpoints, '13', 'meta', 'metadata')
  saved = json.load(open(meta_file))
  saved['checksums'] = meta['checksums']  # those of the state before the change
  with open(meta_file, 'w') as f:
    json.dump(saved, f)
  with pytest.raises(FileNotFoundError, match=r'No intact checkpoint is left in .*: the damaged '
                                              r'ones are moved to .*damaged-13-2\. Run the same '
                                              r'command again to start the run over\.'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(checkpoints)) == ['damaged-13', 'damaged-13-2']


# Runs the straight_run configuration in a child process, after `patch` (Python source) has
# made something go wrong there; argv: data_dir, workdir.
_CHILD = """
import sys
from paraformer_jax import cli, main
{patch}
sys.argv = ['main', '--config=configs/tiny.py', '--config.data.data_dir=' + sys.argv[1],
            '--workdir=' + sys.argv[2], '--config.eval_every_steps=5',
            '--config.keep_checkpoints=1', '--config.training.epochs=1']
cli.run(main.main)
"""

_DISK_FULLS_AT_STEP_10 = """
import resource, signal
from paraformer_jax import checkpoint
real_save = checkpoint.Checkpoints.save
def save(self, step, *args, **kwargs):
  if step == 10:  # once step 5 is on disk, the disk fills up: no file may grow past 64 KiB
    self.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail (EFBIG), nothing is killed
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  return real_save(self, step, *args, **kwargs)
checkpoint.Checkpoints.save = save
"""

_STALLS_COMMITTING_STEP_10 = """
import asyncio
from orbax.checkpoint._src.path import atomicity
real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if self._final_path.name == '10':  # everything is written; the rename is next
    print('COMMITTING 10', flush=True)
    await asyncio.sleep(300)
  return await real_finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


_COMPILE_BLOCKS_IN_C = """
import subprocess
from paraformer_jax import steps
real_make = steps.make_train_step
def make_train_step(*args, **kwargs):
  step = real_make(*args, **kwargs)
  def first(*a, **k):  # a compile as long as a large model's: one call that Python cannot
    print('IN COMPILE', flush=True)  # interrupt (its signal handlers wait until it returns)
    subprocess.run(['sleep', '120'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return step(*a, **k)
  return first
steps.make_train_step = make_train_step
"""


def _child(patch, data_dir, workdir, **popen):
  cmd = [sys.executable, '-c', _CHILD.format(patch=patch), data_dir, workdir]
  # The environment (8 virtual devices) of this process, whose results it is compared with.
  return subprocess.Popen(cmd, cwd=REPO, text=True, **popen)


def _resumes_to_the_straight_run(straight_run, workdir):
  """Only step 5 is complete; the same config resumes from it to the straight result."""
  config, straight = straight_run
  assert train.Trainer(config, workdir).ckpts.all_steps() == [5]
  train.train_and_evaluate(config, workdir)
  got, want = restore_latest(config, workdir), restore_latest(config, straight)
  assert int(got.step) == int(want.step) == 13
  assert trees_equal(got.params, want.params)


@pytest.mark.slow
def test_disk_full_while_saving_says_so_and_keeps_the_previous_checkpoint(straight_run,
                                                                          data_dir, tmp_path):
  workdir = str(tmp_path / 'full')
  proc = _child(_DISK_FULLS_AT_STEP_10, data_dir, workdir, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  # The one message (its fix on the last line), none of the tracebacks of Orbax's threads.
  ours = [l for l in err.strip().splitlines() if not LIBTPU_NOISE.search(l)]
  assert ours[-2].startswith(f'error: Writing a checkpoint to {workdir}/checkpoints failed: '
                             f'{workdir}/checkpoints/10.orbax-checkpoint-tmp/'), err[-3000:]
  assert ours[-2].endswith(': File too large'), err[-3000:]
  assert ours[-1] == ('Nothing earlier was lost: the last complete checkpoint, step 5, is '
                      'intact; the half-written 10.orbax-checkpoint-tmp was removed. If the disk '
                      'or a quota is full, free space (or move the workdir); then rerun the same '
                      'command to resume.')
  assert 'Traceback' not in err and 'ERROR' not in err, err[-3000:]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['5']
  _resumes_to_the_straight_run(straight_run, workdir)


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_first_step_compiles_stops_at_once(data_dir, tmp_path, sig):
  workdir = str(tmp_path / 'compiling')
  proc = _child(_COMPILE_BLOCKS_IN_C, data_dir, workdir, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('IN COMPILE'):
      signalled = time.monotonic()
      proc.send_signal(sig)
      break
  lines += proc.stdout.readlines()
  assert proc.wait(timeout=60) == 128 + sig, ''.join(lines[-20:])
  assert time.monotonic() - signalled < 10  # not after the 120 s call
  # (the handler's own line, which runs when the main thread gets back, may come after it)
  assert (f'interrupted by {signal.Signals(sig).name} before the first training step: stopped '
          f'at once (nothing to save, nothing lost); the same command starts again from the '
          f'last checkpoint, if there is one.\n') in lines[-2:], ''.join(lines[-20:])
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == []


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_resumes_from_the_last_complete_one(
    straight_run, data_dir, tmp_path):
  workdir = str(tmp_path / 'killed')
  proc = _child(_STALLS_COMMITTING_STEP_10, data_dir, workdir, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
  try:
    for line in proc.stdout:
      if line.startswith('COMMITTING 10'):
        proc.kill()  # SIGKILL: no handler, no cleanup
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  # The save was caught in flight: step 10 is on disk, written but never committed.
  assert any(name.startswith('10.orbax-checkpoint-tmp')
             for name in os.listdir(os.path.join(workdir, 'checkpoints')))
  _resumes_to_the_straight_run(straight_run, workdir)


@pytest.mark.slow
def test_fine_tuning_with_another_class_count_restores_all_but_the_head(straight_run, tmp_path):
  config, source_workdir = straight_run
  source = train.Trainer(config, source_workdir)
  best = source.ckpts.best_step()
  want = source.restore(best)[0].params
  tuned = tiny_config(config.data.data_dir, epochs=1)
  tuned.init_from = source_workdir
  tuned.data.num_classes = 12  # a new dataset with more classes (labels 0..9 still valid)
  state = train.Trainer(tuned, str(tmp_path / 'tuned')).states.initial()
  got = jax.device_get(state.params)
  assert trees_equal(got['embed'], want['embed'])
  assert trees_equal(got['branches'], want['branches'])
  assert trees_equal(got['head']['norm'], want['head']['norm'])
  assert got['head']['out']['kernel'].shape == (32, 12)
  # Same class count: the head comes along too, and training starts from it.
  tuned.data.num_classes = 10
  state = train.Trainer(tuned, str(tmp_path / 'tuned10')).states.initial()
  assert trees_equal(jax.device_get(state.params), jax.device_get(want))
  assert int(state.step) == 0
  tuned.model.num_branches = 8
  with pytest.raises(ValueError, match=r"init_from does not fit.*\n.*\['branches'\]"):
    train.Trainer(tuned, str(tmp_path / 'tuned8')).states.initial()


def _independent_greedy(trainer, model, params):
  """Greedy forward selection written afresh: each branch's pooled features on the
  validation split, each candidate set's sum through the head, the most correct added."""
  batches = input_pipeline.eval_batches(trainer.val_source, trainer.config.data,
                                        trainer.config.eval_batch_size, trainer.shard)
  data = input_pipeline.iterate(batches, 0)
  feats, labels, masks = [], [], []
  for batch in data:
    batch = trainer.device_batch(batch)
    feats.append(model.apply({'params': params}, batch['image'],
                             method=ParaFormer.pooled_branch_outputs)[0])
    labels.append(batch['label'])
    masks.append(batch['mask'])
  data.close()
  feats, labels, masks = (jnp.concatenate(x, axis=-2 if x is feats else 0)
                          for x in (feats, labels, masks))

  head = jax.jit(lambda pooled: model.apply({'params': params}, pooled,
                                            method=ParaFormer.logits))

  def correct(subset):
    logits = head(feats[jnp.asarray(subset)].sum(0))
    return int(((jnp.argmax(logits, -1) == labels) * masks).sum())
  order, remaining = [], list(range(model.num_branches))
  while remaining:
    order.append(max(remaining, key=lambda j: correct(order + [j])))
    remaining.remove(order[-1])
  return order


@pytest.mark.slow
@pytest.mark.parametrize('select', ['prefix', 'greedy'])
def test_compressed_checkpoint_gives_the_logits_of_the_kept_branches(straight_run, tmp_path,
                                                                      images, select):
  from paraformer_jax import compress
  from paraformer_jax.model import first_branches
  config, workdir = straight_run
  out = str(tmp_path / 'k2')
  report = compress.compress(config, workdir, out, k=2, select=select)
  assert report['k'] == 2 and sorted(report['order']) == [0, 1, 2, 3]
  if select == 'prefix':
    assert report['kept'] == [0, 1]
  rows = report['rows']
  assert [r['branches'] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]['compression'] == 1.0
  assert rows[1]['compression'] == pytest.approx(rows[-1]['params'] / rows[1]['params'])
  # Within tolerance: the first k whose validation accuracy is that close to the full model's.
  full = rows[-1]['val_accuracy']
  assert report['smallest_k_within_tolerance'] == min(
      r['branches'] for r in rows if r['val_accuracy'] >= full - 0.01)

  source = train.Trainer(config, workdir)
  full_state, _ = source.restore(report['step'])
  model = source.plan.model(0)
  if select == 'greedy':
    assert report['order'] == _independent_greedy(source, model, full_state.params)
  params = compress.reorder(jax.device_get(full_state.params), report['kept'] + [
      b for b in range(4) if b not in report['kept']])
  sub_model, sub_params = first_branches(model, params, 2)
  small = tiny_config(config.data.data_dir, epochs=1)
  small.model.num_branches = 2
  restored, _ = train.Trainer(small, out).restore(report['step'])
  x = images[:, :, :, :1]
  want = jax.jit(sub_model.apply)({'params': sub_params}, x)
  got = jax.jit(sub_model.apply)({'params': jax.device_get(restored.params)}, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(FileExistsError, match='exists'):
    compress.compress(config, workdir, out, k=2)
  if select == 'prefix':  # --k outside 1..4 is refused, and nothing is written
    for k in (0, -1, 5, 9):
      with pytest.raises(ValueError, match=rf'--k={k}: the model has 4 branches; keep 1\.\.4 '):
        compress.compress(config, workdir, str(tmp_path / f'k{k}'), k=k)
      assert not (tmp_path / f'k{k}').exists()


def test_best_step_is_chosen_among_the_final_stage_checkpoints(tmp_path):
  """A stagewise run's stage-1 checkpoint may score best on validation, but it is a smaller
  model: init_from / expand_from / compress then failed on its 2-branch shapes."""
  ckpts = checkpoint.Checkpoints(tmp_path / 'checkpoints', keep=None)
  state = {'w': np.zeros(3, np.float32)}
  for step, stage, acc in ((10, 0, 0.9), (20, 1, 0.7), (30, 1, 0.8), (40, 1, 0.75)):
    ckpts.save(step, state, {'stage': stage}, metrics={'val_accuracy': acc})
  ckpts.wait()
  assert ckpts.best_step() == 30
