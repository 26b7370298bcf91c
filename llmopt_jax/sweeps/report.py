"""A sweep's report: every trial, the best one as a command, an ablation table, and plots.

The report is rebuilt from the study alone (its trials and their user_attrs, see
`sweeps/trials.py`) plus each trial's metrics.jsonl, so any worker can (re)write it at any
time, and a report written while trials still run simply lists them as RUNNING.

report.md and report.json come from the same rows through `llmopt_jax.report.write`; the PNGs
lie beside them. A plot that cannot be drawn yet (too few finished trials, a one-parameter
space for importances) is skipped with its reason written in the report rather than drawn
empty. The time a pruner saves is reported as trial-seconds: those spent in pruned trials,
and an estimate of those it spared (each pruned trial as if it had run as long as the mean
complete trial), since that is the figure a pruner is judged by.
"""

from __future__ import annotations

import collections
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import optuna
from optuna.trial import FrozenTrial, TrialState

from llmopt_jax import compare
from llmopt_jax import report as report_lib
from llmopt_jax.sweeps import stats

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_ENQUEUED = 'enqueued'  # the proposer of a trial whose values were fixed in advance


def write_report(workdir: str, study: optuna.Study, sweep: Any) -> dict:
  """Writes report.md, report.json and the plots of `study` into the sweep's `workdir`;
  returns the record written to report.json."""
  trials = study.get_trials(deepcopy=False)
  rows = [_trial_row(t) for t in trials]
  maximize = sweep.direction == 'maximize'
  complete = [r for r in rows if r['state'] == 'COMPLETE' and r['value'] is not None]
  best = (max if maximize else min)(complete, key=lambda r: r['value']) if complete else None
  ablation = _ablation(trials, sweep, maximize) if sweep.variants else []
  importances = _importances(study, trials)
  plots = _plots(workdir, study, trials, sweep, importances, ablation)
  record = {'study': _study_record(study, sweep, rows), 'best': best, 'trials': rows,
            'importances': importances if isinstance(importances, dict) else None,
            'ablation': [_ablation_record(a) for a in ablation], 'baseline': sweep.baseline or None,
            'plots': plots}
  best_line = (f'Best: trial {best["number"]} ({best["parameters"]}): {sweep.metric} = '
               f'{best["value"]:.4f}; reproduce with `{best["command"]}`'
               if best else 'Best: no trial has completed yet.')
  notes = [_study_line(record['study']), best_line, *_importance_lines(importances),
           *_ablation_lines(ablation, sweep.baseline), *_plot_lines(plots)]
  proposed = any(r['proposer'] not in (None, _ENQUEUED) for r in rows)  # an LLM's study
  if proposed:
    record['llm'] = _llm_record(trials)
    notes.insert(1, _llm_line(record['llm']))
  report_lib.write(workdir, record, rows, _COLUMNS + (_PROPOSER_COLUMNS if proposed else []),
                   title=f'Sweep: {study.study_name}', notes=notes, headline=best_line)
  return record


def _trial_row(trial: FrozenTrial) -> dict[str, Any]:
  attrs = trial.user_attrs
  variant = attrs.get('variant')
  overrides = attrs.get('overrides', trial.params)
  seconds = attrs.get('seconds')
  if seconds is None and trial.datetime_start and trial.datetime_complete:
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
  return {'number': trial.number, 'state': trial.state.name,
          'parameters': variant or ', '.join(f'{k}={_value_text(v)}' for k, v in overrides.items()),
          'variant': variant, 'overrides': overrides, 'value': trial.value,
          'seeds': attrs.get('seeds', []), 'values': attrs.get('values', []),
          'seconds': seconds, 'workdir': attrs.get('workdir', ''),
          'command': attrs.get('command', ''), 'proposer': _proposer(trial),
          'reason': attrs.get('reason', '')}


def _proposer(trial: FrozenTrial) -> str | None:
  """Who chose the trial's values under an LLM sampler ('llm', 'fallback', 'tpe'), or
  'enqueued' for values fixed in advance (the base config's, enqueue_base)."""
  if 'proposer' in trial.user_attrs:
    return trial.user_attrs['proposer']
  return _ENQUEUED if 'fixed_params' in trial.system_attrs else None


def _value_text(value: Any) -> str:
  return format(value, '.4g') if isinstance(value, float) else str(value)


def _num(x: float | None, spec: str = '.4f') -> str:
  return '—' if x is None or math.isnan(x) else format(x, spec)


_COLUMNS = [
    report_lib.field('trial', 'number'), report_lib.field('state', 'state'),
    report_lib.field('parameters', 'parameters'),
    report_lib.Column('value', lambda r: _num(r['value'])),
    report_lib.Column('per seed', lambda r: ', '.join(_num(v) for v in r['values']) or '—'),
    report_lib.Column('seconds', lambda r: _num(r['seconds'], '.0f')),
    report_lib.field('workdir', 'workdir')]


_PROPOSER_COLUMNS = [
    report_lib.Column('proposer', lambda r: r['proposer'] or '—'),
    report_lib.Column('reason', lambda r: ' '.join(r['reason'].split()).replace('|', '/')[:160]
                      or '—')]


def _llm_record(trials: list[FrozenTrial]) -> dict[str, Any]:
  """What the LLM cost and did: requests, answers rejected, tokens, seconds, fallbacks."""
  exchanges = [e for t in trials for e in t.user_attrs.get('llm', [])]
  tokens = sum(e['usage'].get('total_tokens', 0) for e in exchanges
               if isinstance(e.get('usage'), dict))
  proposers = collections.Counter(t.user_attrs.get('proposer') for t in trials)
  proposers.pop(None, None)
  return {'requests': len(exchanges), 'failed': sum(e['error'] is not None for e in exchanges),
          'total_tokens': tokens, 'seconds': sum(e['seconds'] for e in exchanges),
          'trials_by_proposer': dict(proposers)}


def _llm_line(s: Mapping[str, Any]) -> str:
  by = ', '.join(f'{n} by {who}' for who, n in sorted(s['trials_by_proposer'].items()))
  return (f'LLM: {s["requests"]} requests ({s["failed"]} rejected or unanswered), '
          f'{s["total_tokens"]} tokens, {s["seconds"]:.1f} s waiting; trials: {by or "none"}.')


def _study_record(study: optuna.Study, sweep: Any, rows: list[dict]) -> dict[str, Any]:
  seconds = collections.defaultdict(float)
  for r in rows:
    seconds[r['state']] += r['seconds'] or 0.0
  finished = sum(seconds[s.name] for s in _FINISHED)
  complete = [r['seconds'] for r in rows if r['state'] == 'COMPLETE' and r['seconds']]
  pruned = [r for r in rows if r['state'] == 'PRUNED']
  # What the pruned trials would have cost had they run to the end, at the mean complete cost.
  spared = (max(0.0, len(pruned) * sum(complete) / len(complete) - seconds['PRUNED'])
            if complete and pruned else 0.0)
  # The config's names: a study loaded to be reported has Optuna's default pruner, not its own.
  return {'name': study.study_name, 'sampler': sweep.sampler, 'pruner': sweep.pruner,
          'metric': sweep.metric, 'direction': sweep.direction,
          'trials_by_state': dict(collections.Counter(r['state'] for r in rows)),
          'trial_seconds': finished, 'pruned_trial_seconds': seconds['PRUNED'],
          'spared_trial_seconds_estimate': spared,
          'spared_share_estimate': spared / (finished + spared) if spared else 0.0}


def _study_line(s: Mapping[str, Any]) -> str:
  states = ', '.join(f'{n} {state}' for state, n in sorted(s['trials_by_state'].items()))
  line = (f'Study {s["name"]}: {s["sampler"]} sampler, {s["pruner"]} pruner, {s["direction"]} '
          f'{s["metric"]}; trials: {states or "none"}. Trial-seconds: {s["trial_seconds"]:.0f} '
          f'in finished trials, {s["pruned_trial_seconds"]:.0f} in pruned ones.')
  if not s['spared_trial_seconds_estimate']:
    return line
  return (line + f' The pruner spared about {s["spared_trial_seconds_estimate"]:.0f} '
          f'({100 * s["spared_share_estimate"]:.0f}% of the total had no trial been pruned, '
          f'each pruned trial counted at the mean complete trial\'s time).')


def _importances(study: optuna.Study, trials: list[FrozenTrial]) -> dict[str, float] | str:
  """Optuna's parameter importances (its default PED-ANOVA evaluator), or why there are none."""
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  names = {name for t in complete for name in t.params}
  if len(complete) < 2:
    return f'needs at least 2 complete trials, the study has {len(complete)}'
  if len(names) < 2:
    return f'needs at least 2 searched parameters, the space has {len(names)}'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "too few trials" warnings: the check below says it once
    try:
      # Unnormalized: Optuna would turn all-zero importances (too few trials) into equal ones.
      found = optuna.importance.get_param_importances(study, normalize=False)
    except (ValueError, RuntimeError) as e:
      return f'the evaluator failed: {e}'
  total = sum(found.values())
  if not total > 0:
    return (f'too few trials ({len(complete)} complete) for the evaluator to tell the top '
            f'trials\' parameters apart')
  return {name: value / total for name, value in found.items()}


def _importance_lines(importances: dict[str, float] | str) -> list[str]:
  if isinstance(importances, str):
    return []  # the skipped plot's line says why
  return ['Parameter importances (PED-ANOVA): '
          + ', '.join(f'{k} {v:.2f}' for k, v in importances.items()) + '.']


def _ablation(trials: list[FrozenTrial], sweep: Any,
              maximize: bool) -> list[stats.AblationRow]:
  """Per variant, the metric of each seed over its complete trials. A variant sampled twice
  on the same seed counts that seed once (the mean of its runs): a rerun of the same seed is
  not a new sample of the noise."""
  runs: dict[str, dict[int, list[float]]] = {v: collections.defaultdict(list)
                                             for v in sweep.variants}
  for t in trials:
    variant = t.user_attrs.get('variant')
    if t.state != TrialState.COMPLETE or variant is None:
      continue
    for seed, value in zip(t.user_attrs.get('seeds', []), t.user_attrs.get('values', []),
                           strict=True):
      runs.setdefault(variant, collections.defaultdict(list))[seed].append(value)
  by_seed = {v: {s: sum(x) / len(x) for s, x in seeds.items()} for v, seeds in runs.items()}
  return stats.ablation(by_seed, sweep.baseline or None, maximize)


def _summary_record(s: stats.Summary | None) -> dict[str, Any] | None:
  if s is None:
    return None
  return {k: (None if isinstance(v, float) and math.isnan(v) else v)
          for k, v in s._asdict().items()}


def _ablation_record(row: stats.AblationRow) -> dict[str, Any]:
  return {'variant': row.variant, **_summary_record(row.summary),
          'vs_baseline': _summary_record(row.vs_baseline)}


def _ablation_lines(rows: list[stats.AblationRow], baseline: str | None) -> list[str]:
  if not rows:
    return []

  def interval(s: stats.Summary) -> str:
    return f'[{_num(s.ci_low)}, {_num(s.ci_high)}]' if s.n > 1 else '—'

  def spread(s: stats.Summary) -> str:
    return '—' if s.n == 0 else f'{_num(s.mean)} ± {_num(s.std)}'

  def diff(d: stats.Summary | None) -> str:
    return '—' if d is None or d.n == 0 else f'{_num(d.mean, "+.4f")} {interval(d)} (n={d.n})'

  table = compare.markdown_table(
      ['rank', 'variant', 'n', 'mean ± std', '95% interval', f'vs {baseline or "baseline"}'],
      [[i + 1, r.variant + (' (baseline)' if r.variant == baseline else ''), r.summary.n,
        spread(r.summary), interval(r.summary),
        diff(r.vs_baseline)] for i, r in enumerate(rows)])
  heading = ('## Ablation (complete trials; std is the sample std; t intervals; differences '
             'are paired over the seeds both variants ran)')
  return [heading, table]


def _plot_lines(plots: Mapping[str, dict]) -> list[str]:
  return [f'![{name}]({p["file"]})' if 'file' in p else f'Plot {name} skipped: {p["skipped"]}.'
          for name, p in plots.items()]


def _plots(workdir: str, study: optuna.Study, trials: list[FrozenTrial], sweep: Any,
           importances: dict[str, float] | str,
           ablation: list[stats.AblationRow]) -> dict[str, dict]:
  """Draws each plot into `workdir`: name -> {'file': png} or {'skipped': reason}."""
  if jax.process_index() != 0:
    return {}  # report_lib.write writes on the first process only; so do the plots
  from llmopt_jax.sweeps import plots  # matplotlib is imported only when a report is drawn
  drawers = {
      'optimization_history': lambda p: plots.history(p, trials, sweep),
      'param_importances': lambda p: (importances if isinstance(importances, str)
                                      else plots.importances(p, importances)),
      'parallel_coordinates': lambda p: plots.parallel_coordinates(p, study, trials, sweep.metric),
      'learning_curves': lambda p: plots.learning_curves(p, workdir, trials, sweep.metric)}
  if sweep.variants:
    drawers['ablation'] = lambda p: plots.ablation(p, ablation, sweep.baseline, sweep.metric)
  out = {}
  for name, draw in drawers.items():
    skipped = draw(os.path.join(workdir, f'{name}.png'))
    out[name] = {'skipped': skipped} if skipped else {'file': f'{name}.png'}
  return out

