"""The PNG plots of a sweep's report, drawn with matplotlib's Agg backend (no display).

Each function draws one plot at `path` and returns None, or returns why it cannot be drawn
(the report writes that line instead of an empty figure). Parallel coordinates come from
Optuna's own matplotlib plot (it handles log, int and categorical axes); the others are drawn
here because they show what Optuna's do not: pruned trials beside complete ones, learning
curves read from each trial's metrics.jsonl, and ablation error bars from t intervals.
Split from `sweeps/report.py`, which builds the tables, to keep each file one concept.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from llmopt_jax.sweeps import stats


def _pyplot() -> Any:
  import matplotlib  # imported here: only a report that draws pays for it
  matplotlib.use('Agg')
  from matplotlib import pyplot
  return pyplot


def _save(figure: Any, path: str) -> None:
  """Writes `figure` at `path` atomically (a reader never sees half a PNG) and frees it."""
  figure.tight_layout()
  tmp = f'{path}.{os.getpid()}.tmp.png'  # this process's own name: workers may race
  figure.savefig(tmp, dpi=120)
  _pyplot().close(figure)
  os.replace(tmp, path)


def history(path: str, trials: Sequence[FrozenTrial], sweep: Any) -> str | None:
  """Each trial's value by trial number, the best so far as a step line, and each pruned
  trial's last reported value as a cross."""
  complete = [(t.number, t.value) for t in trials
              if t.state == TrialState.COMPLETE and t.value is not None]
  pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
            if t.state == TrialState.PRUNED and t.intermediate_values]
  if not complete and not pruned:
    return 'no trial has finished yet'
  figure, axes = _pyplot().subplots(figsize=(6, 4))
  if complete:
    numbers, values = zip(*complete, strict=True)
    accumulate = np.maximum if sweep.direction == 'maximize' else np.minimum
    axes.plot(numbers, values, 'o', label='complete trial')
    axes.step(numbers, accumulate.accumulate(values), where='post', label='best so far')
  if pruned:
    axes.plot(*zip(*pruned, strict=True), 'x', color='grey', label='pruned (last report)')
  axes.set(xlabel='trial', ylabel=sweep.metric, title='Optimization history')
  axes.grid(alpha=0.3)
  axes.legend(fontsize='small')
  _save(figure, path)
  return None


def importances(path: str, found: Mapping[str, float]) -> str | None:
  """A horizontal bar per parameter, the most important on top."""
  names = list(found)[::-1]
  figure, axes = _pyplot().subplots(figsize=(6, 1 + 0.4 * len(names)))
  axes.barh(names, [found[n] for n in names])
  axes.set(xlabel='importance (PED-ANOVA, normalized)', title='Parameter importances')
  _save(figure, path)
  return None


def parallel_coordinates(path: str, study: optuna.Study, trials: Sequence[FrozenTrial],
                         metric: str) -> str | None:
  """Optuna's parallel coordinates of the complete trials: one axis per parameter."""
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  if not complete:
    return 'no trial has completed yet'
  if not any(t.params for t in complete):
    return 'the complete trials have no parameters'
  _pyplot()  # selects the Agg backend before Optuna imports pyplot
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    # Matplotlib's "identical low and high ylims" when every trial shares a value: harmless.
    warnings.simplefilter('ignore', UserWarning)
    axes = optuna.visualization.matplotlib.plot_parallel_coordinate(study, target_name=metric)
  axes.figure.set_size_inches(7, 4)
  _save(axes.figure, path)
  return None


def learning_curves(path: str, workdir: str, trials: Sequence[FrozenTrial],
                    metric: str) -> str | None:
  """The evaluation metric against the step of every trial that logged one (its first seed's
  run for a multi-seed trial); pruned trials dashed, so where the pruner cut them shows."""
  curves = {t.number: (t.state, _curve(os.path.join(workdir, t.user_attrs['workdir'])))
            for t in trials if t.user_attrs.get('workdir')}
  keys = _curve_keys(metric)
  key = next((k for k in keys
              if any(k in r for _, records in curves.values() for r in records)), None)
  if key is None:
    return f'no trial\'s metrics.jsonl logs {" or ".join(keys)}'
  figure, axes = _pyplot().subplots(figsize=(6, 4))
  for number, (state, records) in sorted(curves.items()):
    points = [(r['step'], r[key]) for r in records if key in r]
    if points:
      axes.plot(*zip(*points, strict=True), linestyle='--' if state == TrialState.PRUNED else '-',
                marker='.', label=f'trial {number}' + (' (pruned)' if state == TrialState.PRUNED
                                                       else ''))
  axes.set(xlabel='step', ylabel=key, title='Learning curves')
  axes.grid(alpha=0.3)
  if len(curves) <= 12:
    axes.legend(fontsize='x-small')
  _save(figure, path)
  return None


def _curve(trial_dir: str) -> list[dict]:
  """The records of the trial's metrics.jsonl: its own, or its first seed's (seed<k>/)."""
  candidates = [os.path.join(trial_dir, 'metrics.jsonl')]
  if os.path.isdir(trial_dir):
    seeds = sorted((d for d in os.listdir(trial_dir) if re.fullmatch(r'seed\d+', d)),
                   key=lambda d: int(d[4:]))
    candidates += [os.path.join(trial_dir, d, 'metrics.jsonl') for d in seeds]
  for candidate in candidates:
    if os.path.exists(candidate):
      return _read_jsonl(candidate)
  return []


def _read_jsonl(path: str) -> list[dict]:
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut short by a kill mid-write
      if isinstance(record, dict) and 'step' in record:
        records.append(record)
  return records


def _curve_keys(metric: str) -> list[str]:
  """`metric`, then its eval/ counterpart: a metric read once at the end (test/accuracy) is
  followed during training on the eval split."""
  return list(dict.fromkeys([metric, 'eval/' + metric.split('/')[-1]]))


def ablation(path: str, rows: Sequence[stats.AblationRow], baseline: str | None,
             metric: str) -> str | None:
  """One bar per variant (ranked), its mean with the 95% t interval as error bars."""
  shown = [r for r in rows if r.summary.n > 0]
  if not shown:
    return 'no variant has a complete trial yet'
  means = [r.summary.mean for r in shown]
  # A single seed has no interval: its bar has no error bar rather than a made-up one.
  errors = [[0.0 if math.isnan(r.summary.ci_low) else r.summary.mean - r.summary.ci_low
             for r in shown],
            [0.0 if math.isnan(r.summary.ci_high) else r.summary.ci_high - r.summary.mean
             for r in shown]]
  figure, axes = _pyplot().subplots(figsize=(1.5 + 0.8 * len(shown), 4))
  colors = ['tab:orange' if r.variant == baseline else 'tab:blue' for r in shown]
  axes.bar([r.variant for r in shown], means, yerr=errors, capsize=4, color=colors)
  low = min(m - e for m, e in zip(means, errors[0], strict=True))
  high = max(m + e for m, e in zip(means, errors[1], strict=True))
  pad = 0.1 * (high - low) or 0.05 * abs(high) or 1.0
  axes.set_ylim(low - pad, high + pad)  # the differences, not the distance from zero
  axes.set(ylabel=f'{metric} (mean, 95% t interval)',
           title='Ablation' + (f' (baseline {baseline} in orange)' if baseline else ''))
  axes.tick_params(axis='x', rotation=30)
  _save(figure, path)
  return None
