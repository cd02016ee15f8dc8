"""Expansion: new classes and branches beside a frozen trained model (continual learning)."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import flops_test
from train_test import tiny_config, trees_equal

from paraformer_jax import compress, finetune, input_pipeline, replay, run_state, train
from paraformer_jax.model import first_branches, merge_frozen


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A tiny run on the digits 0-4, then 2 branches added for 5-9."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  source = tiny_config(data_dir, epochs=1)
  source.data.classes, source.data.num_classes = '0-4', 5
  source_dir = str(tmp_path_factory.mktemp('digits0to4'))
  train.train_and_evaluate(source, source_dir)
  grown = tiny_config(data_dir, epochs=1)
  grown.data.classes, grown.model.num_branches, grown.expand_from = '5-9', 2, source_dir
  grown_dir = str(tmp_path_factory.mktemp('digits5to9'))
  results = train.train_and_evaluate(grown, grown_dir)
  return source, source_dir, grown, grown_dir, results


@pytest.mark.slow
def test_old_branches_and_old_head_rows_stay_bit_identical(runs, tmp_path):
  source, source_dir, grown, grown_dir, _ = runs
  trainer = train.Trainer(grown, grown_dir)
  before, _ = finetune.load_pretrained(source_dir, trainer.mesh)
  after = jax.device_get(trainer.restore(trainer.ckpts.latest_step())[0].params)
  start = jax.device_get(train.Trainer(grown, str(tmp_path / 'fresh')).states.initial().params)
  for params in (start, after):
    assert trees_equal(params['frozen_branches'], before['branches'])
    assert trees_equal(params['embed'], before['embed'])
    assert trees_equal(params['frozen_head'], before['head'])  # its LayerNorm and rows 0-4
  # Frozen means no gradient and no optimizer state: Adam's moments exist only for what is
  # trained, the new branches and the 5 new classes' rows.
  state = trainer.restore(trainer.ckpts.latest_step())[0]
  adam = state.opt_state['shared'][0]
  assert set(adam.mu) == {'head'} and adam.mu['head']['out']['kernel'].shape == (32, 5)
  assert set(jax.tree.leaves(state.opt_state['branches'][0].mu)[0].shape[:1]) == {2}
  # What is trained did change: the new branches and the new classes' rows.
  new_rows = lambda params: np.asarray(params['head']['out']['kernel'])
  assert np.abs(new_rows(after) - new_rows(start)).min() > 0
  assert not trees_equal(after['branches'], start['branches'])
  # So the old model is inside the new one: its first 4 branches give the old logits on the
  # old classes' rows.
  images = np.asarray(jax.random.normal(jax.random.key(0), (4, 8, 8, 1)))
  old_model = run_state.build_model(source)
  grown_model, grown_params = first_branches(
      *merge_frozen(trainer.plan.model(0), after), old_model.num_branches)
  np.testing.assert_allclose(grown_model.apply({'params': grown_params}, images)[:, :5],
                             old_model.apply({'params': before}, images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_expansion_trains_on_the_new_classes_and_reports_forgetting(runs):
  source, source_dir, grown, grown_dir, results = runs
  trainer = train.Trainer(grown, grown_dir)
  raw = input_pipeline.get_source('sklearn_digits', 'train', grown.data.data_dir)
  want = [int(raw[i]['label']) for i in range(len(raw)) if raw[i]['label'] >= 5]
  got = [int(trainer.train_source[i]['label']) for i in range(len(trainer.train_source))]
  assert got == want
  rows = json.load(open(os.path.join(grown_dir, 'forgetting.json')))
  assert [r['data'] for r in rows] == ['old', 'new', 'all'] and rows == results['forgetting']
  assert [r['classes'] for r in rows] == ['0-4', '5-9', '0-9']
  # 'before' on the old classes is the source run's own test accuracy at the same checkpoint.
  step = train.Trainer(source, source_dir).ckpts.best_step()
  own = train.evaluate_checkpoint(source, source_dir, step)['prefix_accuracy'][-1]
  assert rows[0]['before'] == pytest.approx(own)
  assert rows[1]['before'] == 0.0  # the old head has no rows for 5-9
  assert rows[0]['examples'] + rows[1]['examples'] == rows[2]['examples'] == 360  # all of test


@pytest.mark.slow
def test_compressed_expansion_run_evaluates_like_the_merged_model(runs, tmp_path):
  """compress of an expansion run once wrote a workdir that --mode=eval could not restore
  (its config still named expand_from, so the model expected frozen branches)."""
  _, _, grown, grown_dir, _ = runs
  out = str(tmp_path / 'k5')
  report = compress.compress(grown, grown_dir, out, k=5)
  small = ml_collections.ConfigDict(json.load(open(os.path.join(out, 'config.json'))))
  got = train.evaluate_checkpoint(small, out)['prefix_accuracy']
  assert got == pytest.approx([r['test_accuracy'] for r in report['rows']][:5])


def test_classes_spec():
  assert input_pipeline.parse_classes('0-4') == (0, 1, 2, 3, 4)
  assert input_pipeline.format_classes((7, 0, 1, 2, 4, 5)) == '0-2,4-5,7'
  assert input_pipeline.parse_classes(input_pipeline.format_classes((9, 3, 1))) == (1, 3, 9)
  assert input_pipeline.parse_classes('7, 1-2,1') == (1, 2, 7)
  assert input_pipeline.parse_classes('') == ()
  with pytest.raises(ValueError, match="labels like '0-4'"):
    input_pipeline.parse_classes('zero-four')


def _replaying(runs, tmp_path, classes='5-9', **settings):
  """A Trainer (nothing written) of the expansion with replay settings."""
  config = ml_collections.ConfigDict(runs[2].to_dict())
  config.update(settings)
  config.data.classes = classes
  return train.Trainer(config, str(tmp_path / 'replaying'), create=False)


@pytest.mark.slow
def test_replay_keeps_exactly_the_budget_of_each_old_class_from_its_training_split(runs,
                                                                                   tmp_path):
  trainer = _replaying(runs, tmp_path, replay_per_class=7)
  raw = input_pipeline.get_source('sklearn_digits', 'train', trainer.config.data.data_dir)
  labels = np.array([int(raw[i]['label']) for i in range(len(raw))])
  indices = trainer.replay['indices']
  assert len(set(indices)) == len(indices) == 35
  assert sorted(np.bincount(labels[indices], minlength=10).tolist()) == [0] * 5 + [7] * 5
  assert set(labels[indices]) == {0, 1, 2, 3, 4}
  # The training examples: every 5-9 example of the split, then the 35 replayed ones.
  new = [i for i in range(len(raw)) if labels[i] >= 5]
  got = [int(trainer.train_source[i]['label']) for i in range(len(trainer.train_source))]
  assert got == labels[new].tolist() + labels[indices].tolist()
  assert not os.path.exists(tmp_path / 'replaying')  # drawn, not yet written


@pytest.mark.slow
def test_replay_budget_beyond_a_class_and_overlapping_classes_are_refused(runs, tmp_path):
  raw = input_pipeline.get_source('sklearn_digits', 'train', runs[2].data.data_dir)
  zeros = sum(int(raw[i]['label']) == 0 for i in range(len(raw)))
  with pytest.raises(ValueError, match=rf'replay_per_class=1000 is more than the {zeros} '
                                       r'training examples of old class 0'):
    _replaying(runs, tmp_path, replay_per_class=1000)
  with pytest.raises(ValueError, match=r"classes='3-9' overlaps the classes of .* 3,4\. "):
    _replaying(runs, tmp_path, classes='3-9')


def test_weight_aligning_gives_the_new_rows_the_old_rows_mean_norm():
  rng = np.random.default_rng(0)
  old = {'kernel': rng.normal(size=(6, 5)), 'bias': rng.normal(size=5)}
  new = {'kernel': 3 * rng.normal(size=(6, 4)), 'bias': rng.normal(size=4)}
  params = {'frozen_head': {'out': old}, 'head': {'out': new}, 'branches': 1}
  got = replay.align_head(params)
  norms = lambda k: np.sqrt((np.asarray(k) ** 2).sum(0))
  gamma = norms(old['kernel']).mean() / norms(new['kernel']).mean()
  np.testing.assert_allclose(norms(got['head']['out']['kernel']).mean(),
                             norms(old['kernel']).mean(), rtol=1e-6)
  np.testing.assert_allclose(got['head']['out']['bias'], gamma * new['bias'], rtol=1e-6)
  assert got['frozen_head'] is params['frozen_head'] and got['branches'] == 1


@pytest.mark.slow
def test_an_expansion_with_replay_and_alignment_trains_keeps_its_memory_and_aligns(runs,
                                                                                   tmp_path):
  _, source_dir, grown, _, _ = runs
  config = ml_collections.ConfigDict(grown.to_dict())
  config.replay_per_class, config.align_head = 7, True
  workdir = str(tmp_path / 'replayed')
  results = train.train_and_evaluate(config, workdir)
  trainer = train.Trainer(config, workdir)
  assert json.load(open(os.path.join(workdir, 'replay.json'))) == trainer.replay
  params = jax.device_get(trainer.restore(trainer.ckpts.latest_step())[0].params)
  norms = lambda k: np.sqrt((np.asarray(k) ** 2).sum(0)).mean()
  np.testing.assert_allclose(norms(params['head']['out']['kernel']),
                             norms(params['frozen_head']['out']['kernel']), rtol=1e-5)
  assert [r['data'] for r in results['forgetting']] == ['old', 'new', 'all']


@pytest.mark.slow
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_expansion_and_fine_tuning_report_the_flops_xla_counts(runs, dropout):
  """Expansion's frozen branches and head rows run forward only; fine-tuning is a joint step."""
  source, source_dir, grown, grown_dir, _ = runs
  grown = ml_collections.ConfigDict(grown.to_dict())
  grown.model.dropout = dropout
  tuned = tiny_config(source.data.data_dir)
  tuned.init_from, tuned.model.dropout = source_dir, dropout
  for config, workdir in ((grown, grown_dir), (tuned, source_dir)):
    trainer = train.Trainer(config, workdir, create=False)
    flops_test.assert_close(flops_test.loop_flops(trainer, 0), flops_test.xla_flops(trainer))
