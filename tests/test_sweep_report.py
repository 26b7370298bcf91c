"""The sweep report and its statistics: t intervals and paired differences in closed form,
every trial listed with its state, the best trial named for either direction, the ablation
table ranked and differenced, and the plots written as PNGs or skipped with a reason.

Studies are built in memory with Optuna's `create_trial`, carrying the user_attrs that
`sweeps/trials.py` records, so these tests run in seconds without training anything.
"""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats as scipy_stats

from llmopt_jax.sweeps import report, stats
from llmopt_jax.train.logger import Logger

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
SPACE = {'optim.lr': FloatDistribution(1e-5, 1e-2, log=True),
         'train.num_steps': IntDistribution(10, 100)}


def _sweep(direction='maximize', variants=None, baseline=None, seeds=1, sampler='tpe',
           pruner='none'):
  """The SweepConfig fields the report reads."""
  return types.SimpleNamespace(metric='eval/accuracy', direction=direction, baseline=baseline,
                               variants=variants or {}, seeds=seeds, sampler=sampler,
                               pruner=pruner)


def _trial(number, state=TrialState.COMPLETE, params=None, values=(), seeds=None,
           seconds=10.0, variant=None, distributions=None, intermediate=None,
           system_attrs=None):
  params = params if params is not None else {'optim.lr': 1e-3, 'train.num_steps': 20}
  seeds = list(seeds if seeds is not None else range(len(values)))
  value = float(np.mean(values)) if state == TrialState.COMPLETE else None
  attrs = {'overrides': params if variant is None else {'model.dropout_rate': 0.1},
           'variant': variant, 'workdir': f'trials/{number}', 'seeds': seeds,
           'values': list(values), 'seconds': seconds,
           'command': f'python main.py --config=configs/finetune.py:tiny --trial={number}'}
  return create_trial(state=state, value=value, params=params,
                      distributions=distributions or SPACE, user_attrs=attrs,
                      system_attrs=system_attrs, intermediate_values=intermediate)


def _study(direction, trials):
  study = optuna.create_study(direction=direction, study_name='test')
  for t in trials:
    study.add_trial(t)
  return study


def _png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_MAGIC


def test_summary_matches_the_t_interval_formula():
  values = [0.81, 0.84, 0.79, 0.86, 0.83]
  n, mean, std, low, high = stats.summary(values)
  expected_mean = sum(values) / 5
  expected_std = math.sqrt(sum((v - expected_mean) ** 2 for v in values) / 4)  # ddof=1
  half = scipy_stats.t.ppf(0.975, df=4) * expected_std / math.sqrt(5)
  eps = 8 * np.finfo(np.float64).eps
  assert n == 5
  assert mean == pytest.approx(expected_mean, rel=eps)
  assert std == pytest.approx(expected_std, rel=eps)
  assert (low, high) == pytest.approx((expected_mean - half, expected_mean + half), rel=eps)
  # And the same interval as scipy's own t.interval around the standard error.
  reference = scipy_stats.t.interval(0.95, df=4, loc=expected_mean,
                                     scale=expected_std / math.sqrt(5))
  assert (low, high) == pytest.approx(reference, rel=eps)


def test_summary_of_one_or_no_value_has_no_interval():
  assert stats.summary([0.7])[:2] == (1, 0.7)
  assert all(math.isnan(x) for x in stats.summary([0.7])[2:])
  empty = stats.summary([])
  assert empty.n == 0 and all(math.isnan(x) for x in empty[1:])


def test_paired_difference_is_the_summary_of_per_seed_differences():
  a = {0: 0.80, 1: 0.70, 2: 0.90, 3: 0.75}
  b = {1: 0.60, 2: 0.85, 3: 0.70, 5: 0.50}  # seeds 0 and 5 are not shared
  assert stats.paired_difference(a, b) == pytest.approx(
      stats.summary([a[1] - b[1], a[2] - b[2], a[3] - b[3]]))
  assert stats.paired_difference(a, b).n == 3
  # A constant per-seed gain is known exactly, however much the seeds themselves vary.
  shifted = {s: v + 0.01 for s, v in a.items()}
  d = stats.paired_difference(shifted, a)
  assert d.mean == pytest.approx(0.01) and d.std == pytest.approx(0.0, abs=1e-15)
  unpaired = stats.summary(list(a.values()))
  assert unpaired.ci_high - unpaired.mean > 10 * 0.01  # unpaired, it hides in the seeds' spread
  assert stats.paired_difference(a, {9: 1.0}).n == 0  # no shared seed: no difference


def test_report_lists_every_trial_with_its_state(tmp_path):
  states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
            TrialState.COMPLETE]
  trials = [_trial(i, s, values=[0.5 + 0.1 * i] if s == TrialState.COMPLETE else [],
                   seconds=None if s == TrialState.RUNNING else 10.0 * (i + 1))
            for i, s in enumerate(states)]
  record = report.write_report(str(tmp_path), _study('maximize', trials), _sweep())
  saved = json.loads((tmp_path / 'report.json').read_text())
  assert [(t['number'], t['state']) for t in saved['trials']] == [
      (i, s.name) for i, s in enumerate(states)]
  markdown = (tmp_path / 'report.md').read_text()
  for i, s in enumerate(states):
    assert f'| {i} | {s.name} | optim.lr=0.001, train.num_steps=20 |' in markdown
  study = record['study']
  assert study['trials_by_state'] == {'COMPLETE': 2, 'PRUNED': 1, 'FAIL': 1, 'RUNNING': 1}
  assert study['trial_seconds'] == pytest.approx(10 + 20 + 30 + 50)  # not the running one
  assert study['pruned_trial_seconds'] == pytest.approx(20)
  # Had the pruned trial run on, it would have cost the mean complete trial: (10 + 50) / 2.
  assert study['spared_trial_seconds_estimate'] == pytest.approx(30 - 20)
  assert study['spared_share_estimate'] == pytest.approx(10 / (110 + 10))


def test_report_names_the_sweeps_sampler_and_pruner_and_a_base_trial_is_no_llm_study(
    tmp_path):
  """A report written from a study loaded afresh (which carries Optuna's default pruner, not
  the sweep's) names the sweep's own sampler and pruner; a trial 0 enqueued with the base
  config's values (enqueue_base) does not make it an LLM sampler's study."""
  base = {'optim.lr': 1e-3, 'train.num_steps': 20}
  trials = [_trial(0, params=base, values=[0.8], system_attrs={'fixed_params': base}),
            _trial(1, params={'optim.lr': 3e-3, 'train.num_steps': 40}, values=[0.9])]
  record = report.write_report(str(tmp_path), _study('maximize', trials),
                               _sweep(sampler='random', pruner='hyperband'))
  assert (record['study']['sampler'], record['study']['pruner']) == ('random', 'hyperband')
  assert 'llm' not in record
  markdown = (tmp_path / 'report.md').read_text()
  assert 'random sampler, hyperband pruner' in markdown
  assert 'LLM' not in markdown


@pytest.mark.parametrize('direction', ['maximize', 'minimize'])
def test_best_line_names_the_best_trial(tmp_path, direction):
  values = [0.62, 0.91, 0.35, 0.77]
  trials = [_trial(i, values=[v], params={'optim.lr': 1e-4 * (i + 1), 'train.num_steps': 10 + i})
            for i, v in enumerate(values)]
  trials.append(_trial(4, TrialState.PRUNED, intermediate={5: 0.99 if direction == 'maximize'
                                                           else 0.01}))
  record = report.write_report(str(tmp_path), _study(direction, trials), _sweep(direction))
  best = int(np.argmax(values) if direction == 'maximize' else np.argmin(values))
  assert record['best']['number'] == best
  markdown = (tmp_path / 'report.md').read_text()
  assert (f'Best: trial {best} (optim.lr={1e-4 * (best + 1):.4g}, '
          f'train.num_steps={10 + best}): eval/accuracy = {values[best]:.4f}; reproduce with '
          f'`python main.py --config=configs/finetune.py:tiny --trial={best}`') in markdown


def _log_run(run_dir, accuracies, stop=None):
  """A run's metrics.jsonl, written by the project's own logger (train and eval records)."""
  run_dir.mkdir(parents=True)
  logger = Logger(str(run_dir), total_steps=10 * len(accuracies), start_step=0)
  for k, accuracy in enumerate(accuracies[:stop], start=1):
    logger.write(10 * k, {'train/loss': 1.0 / k})
    logger.write(10 * k, {'eval/accuracy': accuracy, 'eval/loss': 1.0 - accuracy})
  logger.close()


def test_plots_are_written_as_png(tmp_path):
  trials = [_trial(0, values=[0.6], params={'optim.lr': 1e-4, 'train.num_steps': 30}),
            _trial(1, values=[0.8, 0.7], params={'optim.lr': 3e-4, 'train.num_steps': 50}),
            _trial(2, TrialState.PRUNED, params={'optim.lr': 1e-2, 'train.num_steps': 90},
                   intermediate={10: 0.2}),
            _trial(3, values=[0.75], params={'optim.lr': 5e-4, 'train.num_steps': 20})]
  _log_run(tmp_path / 'trials/0', [0.3, 0.5, 0.6])
  _log_run(tmp_path / 'trials/1/seed0', [0.4, 0.6, 0.8])  # a multi-seed trial: its first seed
  _log_run(tmp_path / 'trials/2', [0.2, 0.2, 0.2], stop=1)
  record = report.write_report(str(tmp_path), _study('maximize', trials), _sweep())
  names = ['optimization_history', 'param_importances', 'parallel_coordinates',
           'learning_curves']
  assert record['plots'] == {n: {'file': f'{n}.png'} for n in names}
  for name in names:
    assert _png(tmp_path / f'{name}.png'), name
    assert f'![{name}]({name}.png)' in (tmp_path / 'report.md').read_text()
  assert sum(record['importances'].values()) == pytest.approx(1.0)


def test_plots_that_cannot_be_drawn_are_skipped_with_a_reason(tmp_path):
  one_param = {'optim.lr': FloatDistribution(1e-5, 1e-2, log=True)}
  trials = [_trial(0, values=[0.6], params={'optim.lr': 1e-4}, distributions=one_param),
            _trial(1, TrialState.FAIL, params={'optim.lr': 1e-2}, distributions=one_param)]
  record = report.write_report(str(tmp_path), _study('maximize', trials), _sweep())
  markdown = (tmp_path / 'report.md').read_text()
  assert record['plots']['param_importances'] == {
      'skipped': 'needs at least 2 complete trials, the study has 1'}
  assert 'learning_curves' in record['plots'] and 'file' not in record['plots']['learning_curves']
  for name, plot in record['plots'].items():
    assert os.path.exists(tmp_path / f'{name}.png') == ('file' in plot), name
    if 'skipped' in plot:
      assert f'Plot {name} skipped: {plot["skipped"]}.' in markdown

  empty = tmp_path / 'empty'
  empty.mkdir()
  record = report.write_report(str(empty), _study('minimize', []), _sweep('minimize'))
  assert record['best'] is None and all('skipped' in p for p in record['plots'].values())
  assert 'Best: no trial has completed yet.' in (empty / 'report.md').read_text()


@pytest.mark.parametrize('direction', ['maximize', 'minimize'])
def test_ablation_table_ranks_and_differences_against_the_baseline(tmp_path, direction):
  runs = {'labels': [0.70, 0.74, 0.72],      # the baseline
          'distilled': [0.75, 0.80, 0.76],   # +0.05, +0.06, +0.04 on the same seeds
          'hot': [0.60, 0.66],               # seeds 0 and 1 only
          'unrun': []}                       # no complete trial yet
  names = list(runs)
  distribution = {'variant': CategoricalDistribution(names)}
  trials = [_trial(i, values=v, variant=name, params={'variant': name},
                   distributions=distribution) for i, (name, v) in enumerate(runs.items()) if v]
  trials.append(_trial(3, TrialState.PRUNED, variant='unrun', params={'variant': 'unrun'},
                       distributions=distribution))
  sweep = _sweep(direction, variants={n: {} for n in names}, baseline='labels', seeds=3)
  record = report.write_report(str(tmp_path), _study(direction, trials), sweep)
  ranked = ['distilled', 'labels', 'hot'] if direction == 'maximize' else [
      'hot', 'labels', 'distilled']
  rows = {r['variant']: r for r in record['ablation']}
  assert [r['variant'] for r in record['ablation']] == [*ranked, 'unrun']
  for name, values in runs.items():
    assert rows[name]['n'] == len(values)
    if values:
      assert rows[name]['mean'] == pytest.approx(np.mean(values))
  assert rows['labels']['vs_baseline'] is None
  assert rows['distilled']['vs_baseline']['mean'] == pytest.approx(0.05)
  assert rows['distilled']['vs_baseline']['n'] == 3
  assert rows['hot']['vs_baseline'] == pytest.approx(
      stats.paired_difference({0: 0.60, 1: 0.66}, {0: 0.70, 1: 0.74})._asdict())
  assert rows['unrun']['mean'] is None and rows['unrun']['ci_low'] is None
  markdown = (tmp_path / 'report.md').read_text()
  assert f'| 1 | {ranked[0]} | {len(runs[ranked[0]])} |' in markdown
  assert '| labels (baseline) |' in markdown
  assert _png(tmp_path / 'ablation.png')
  assert record['plots']['param_importances']['skipped'].startswith(
      'needs at least 2 searched parameters')
