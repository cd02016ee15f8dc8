"""Expansion: new classes and branches beside a frozen trained model (continual learning)."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from train_test import tiny_config, trees_equal

from paraformer_jax import compress, finetune, input_pipeline, run_state, train
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
  new_rows = lambda params: params['head']['out']['kernel']
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
  assert [r['data'] for r in rows] == ['old', 'new'] and rows == results['forgetting']
  # 'before' on the old classes is the source run's own test accuracy at the same checkpoint.
  step = train.Trainer(source, source_dir).ckpts.best_step()
  own = train.evaluate_checkpoint(source, source_dir, step)['prefix_accuracy'][-1]
  assert rows[0]['before'] == pytest.approx(own)
  assert rows[1]['before'] == 0.0  # the old head has no rows for 5-9
  assert rows[0]['examples'] + rows[1]['examples'] == 360  # the whole test split


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
  assert input_pipeline.parse_classes('7, 1-2,1') == (1, 2, 7)
  assert input_pipeline.parse_classes('') == ()
  with pytest.raises(ValueError, match="labels like '0-4'"):
    input_pipeline.parse_classes('zero-four')
