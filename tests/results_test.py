"""docs/make_results.py's bookkeeping: update counts and the statistics behind its claims."""
import os
import sys

import numpy as np
import pytest
import scipy.stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'docs'))
import make_results  # noqa: E402

from configs import digits  # noqa: E402
from paraformer_jax import input_pipeline  # noqa: E402
from paraformer_jax.run_state import StagePlan  # noqa: E402


def test_steps_per_epoch_is_the_digits_training_split_in_minibatches():
  config = digits.get_config()
  train = input_pipeline.split_source(config.data, config.data.train_split)
  assert len(train) // config.training.batch_size == make_results.STEPS_PER_EPOCH


@pytest.mark.parametrize('name', make_results.CONTENDERS)
def test_update_counts_follow_the_trainers_own_plan(name):
  """Optimizer updates from the trainer's StagePlan (stages x steps; an lpa LPA-pass step
  makes one update per branch): equal to the count the tables print, and the budget met
  (stagewise: within one stage's epoch below it)."""
  for budget in make_results.BUDGETS:
    overrides, counted = make_results.contender(name, budget)
    config = digits.get_config()
    config.update_from_flattened_dict(overrides)
    plan = StagePlan(config, make_results.STEPS_PER_EPOCH)
    steps = plan.num_stages * plan.steps_per_stage
    if config.training.mode == 'lpa':  # epochs alternate: LPA pass, full pass
      updates = steps // 2 * config.model.num_branches + steps // 2
    else:
      updates = steps
    assert updates == counted
    slack = 8 * make_results.STEPS_PER_EPOCH if name == 'stagewise' else 0
    assert budget - slack <= updates <= budget


def test_welch_matches_the_textbook_formula_and_decides_ties_at_5_percent():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.9, 0.02, 5), rng.normal(0.86, 0.03, 6)
  va, vb = a.var(ddof=1) / 5, b.var(ddof=1) / 6
  t = (a.mean() - b.mean()) / np.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 5)
  p = 2 * scipy.stats.t.sf(abs(t), df)
  half = scipy.stats.t.ppf(0.975, df) * np.sqrt(va + vb) * 100
  diff = 100 * (a.mean() - b.mean())
  text = make_results.welch(a, b, 'B')
  shown = f'p = {p:.3f}' if p >= 0.001 else 'p < 0.001'
  assert text.startswith(f'{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}], {shown}')
  assert text.endswith('ahead of B' if p < 0.05 else 'tie')
  assert make_results.welch(b, a, 'A').endswith('behind A' if p < 0.05 else 'tie')
  assert make_results.welch(a, a + 1e-4 * rng.normal(size=5), 'C').endswith('tie')


def test_summary_names_the_best_the_tied_and_the_behind():
  rows = [('joint', '+0.10 [...], p = 0.800: tie'), ('lpa', 'best'),
          ('stagewise', '-9.00 [...], p = 0.001: behind lpa')]
  assert make_results.summary(rows, '684 updates') == (
      '- 684 updates: best `lpa`; tied with it (Welch, p >= 0.05): `joint`; behind it: '
      '`stagewise`.')


def test_pending_runs_skip_finished_ones_and_come_seed_by_seed(tmp_path):
  """The first seed of every config trains before any second seed (which then reads the
  compiled programs from the cache); a run with its wall time recorded is not trained again,
  and a run asked for twice trains once."""
  specs = [make_results.spec(name, seed, digits.get_config, **{'training.epochs': 1})
           for name in ('a', 'b') for seed in (2, 0, 1)]
  done = specs[1].workdir(str(tmp_path))  # a, seed 0
  os.makedirs(done)
  open(os.path.join(done, 'wall_seconds.json'), 'w').write('1.0')
  todo = make_results.pending(str(tmp_path), specs + specs[:2])
  assert [(s.name, s.seed) for s in todo] == [('b', 0), ('a', 1), ('b', 1), ('a', 2),
                                              ('b', 2)]
