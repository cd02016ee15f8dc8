"""The FLOPs the training loop reports per step against XLA's count of the same program.

The loop's figure (`StageLoop.step_flops`, the source of its TFLOP/s and MFU) is compared
with `cost_analysis()` of the training step compiled for one device, in every mode, with
dropout and without. XLA counts more than the matmuls the analytic figure holds (softmax,
LayerNorm, dropout masks, Adam), so the two agree within TOLERANCE, not exactly.
"""
import jax
import numpy as np
import pytest

from configs import tiny
from paraformer_jax import run_state, sharding, steps, train

# The loop's FLOPs per step within 12% of XLA's (docs/training.md states it).
TOLERANCE = 0.12


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def flops_config(data_dir, mode, dropout, **overrides):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.training.mode = mode
  config.model.dropout = dropout
  config.update_from_flattened_dict(overrides)
  return config


def xla_flops(trainer, stage=0):
  """cost_analysis()['flops'] of the stage's training step compiled for one device."""
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  t = trainer.config.training
  step = steps.make_train_step(trainer.plan.model(stage), mesh, trainer.tx, t.mode, trainer.plan.frozen_keys(stage),
                               t.clip_norm, t.label_smoothing, t.grad_clip_norm)
  size, batch = trainer.config.data.image_size, t.batch_size
  state = run_state.abstract_state(trainer.plan, trainer.tx, mesh, stage,
                                   (size, size, trainer.channels))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  images = jax.ShapeDtypeStruct((batch, size, size, trainer.channels), np.float32)
  data = {'image': images, 'label': jax.ShapeDtypeStruct((batch,), np.int32),
          'mask': jax.ShapeDtypeStruct((batch,), np.float32)}
  return step.lower(state, data).compile().cost_analysis()['flops']


def loop_flops(trainer, stage, lpa_pass=False):
  return train.StageLoop(trainer, stage, None, None).step_flops[lpa_pass]


def assert_close(loop, xla):
  assert loop > 0 and abs(loop - xla) <= TOLERANCE * xla, (loop, xla, loop / xla)


@pytest.mark.parametrize('dropout', [0.0, 0.1])
@pytest.mark.parametrize('mode', ['joint', 'lpa_fused', 'lpa'])
def test_one_stage_modes_report_the_flops_xla_counts(data_dir, tmp_path, mode, dropout):
  trainer = train.Trainer(flops_config(data_dir, mode, dropout), str(tmp_path), create=False)
  assert_close(loop_flops(trainer, 0), xla_flops(trainer))


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_an_lpa_pass_step_reports_the_flops_of_its_prefix_updates(data_dir, tmp_path, dropout):
  """XLA counts a loop's body once: the pass's L updates are L prefix models' steps, each
  counted on its own (update k trains branches 1..k on one minibatch)."""
  config = flops_config(data_dir, 'lpa', dropout)
  trainer = train.Trainer(config, str(tmp_path), create=False)
  prefixes = sum(xla_flops(train.Trainer(
      flops_config(data_dir, 'joint', dropout, **{'model.num_branches': k}), str(tmp_path),
      create=False)) for k in range(1, config.model.num_branches + 1))
  assert_close(loop_flops(trainer, 0, lpa_pass=True), prefixes)


@pytest.mark.parametrize('train_embed', [False, True])
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_every_stagewise_stage_reports_the_flops_xla_counts(data_dir, tmp_path, dropout,
                                                            train_embed):
  config = flops_config(data_dir, 'stagewise', dropout, **{
      'training.branches_per_stage': 1,
      'training.train_embed_in_later_stages': train_embed})
  trainer = train.Trainer(config, str(tmp_path), create=False)
  for stage in (1, 3):  # a later stage's frozen branches run forward only
    assert_close(loop_flops(trainer, stage), xla_flops(trainer, stage))
