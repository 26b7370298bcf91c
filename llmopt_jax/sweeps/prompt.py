"""What the LLM advisor is asked: a task card, the search space, and the trials so far.

The default template follows the project's founding request ("Please recommend a set of
hyperparameters that will optimize the performance of this ... dataset using a
transformer-based architecture ..."), made precise: the space is given as JSON with each
parameter's type, bounds, scale and base value, the history as one JSON line per trial (the
best ones, then the most recent others, with their state, metric and run time), and the
answer format is one JSON object. Machine-readable sections serve both a model and a
scripted proposer that reads them back.

A user template (`config.sweep.llm.prompt`) is Python `str.format` text using any of
`FIELDS` as {placeholders}; literal braces are doubled ({{ }}). It is checked before the
sweep starts, so a misspelt placeholder is a one-line config error, not a failed trial.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from optuna.trial import FrozenTrial, TrialState

FIELDS = ('task_card', 'space', 'history', 'n_trials', 'trials_left', 'budget', 'metric',
          'direction', 'answer_format')
SYSTEM = ('You are an expert in training machine learning models, asked to tune the '
          'hyperparameters of a training run. You answer with a single JSON object only.')
DEFAULT_TEMPLATE = """\
Please recommend a set of hyperparameters that will optimize the performance of this model on \
this dataset, within the search space below.

{task_card}

Search space (JSON). Give every parameter: "float" and "int" values within [low, high] \
("log": explore by factors), "int" values whole and on the step, "categorical" values one of \
the choices; "base" is the value the run uses when the parameter is not tuned:
{space}

Trials so far: {n_trials}, of a budget of {budget} ({trials_left} left, this one included). \
The best ones first, then the most recent (JSON lines; "value" is {metric}, to {direction}):
{history}

Propose the configuration of the next trial: the one you expect to do best given these \
results, or one that tests a promising region not explored yet. Never repeat a configuration \
already tried. Answer with one JSON object and nothing else, in this form:
{answer_format}"""


def check_template(template: str, field: str) -> None:
  """One-line error naming `field` for a placeholder outside FIELDS or unbalanced braces."""
  try:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
  except ValueError as e:
    raise ValueError(f'{field}: not a valid template ({e}); write literal braces as {{{{ }}}}'
                     ) from None
  unknown = sorted({n for n in names if n not in FIELDS})
  if unknown:
    raise ValueError(f'{field}: unknown placeholder {{{unknown[0]}}}; choose from '
                     f'{", ".join("{" + f + "}" for f in FIELDS)}')


def messages(template: str, card: Mapping[str, str], space: Mapping[str, dict],
             history: Sequence[Mapping[str, Any]], n_trials: int, budget: int, metric: str,
             direction: str) -> list[dict[str, str]]:
  """The chat request of one proposal: the system message and the filled template."""
  fields = {
      'task_card': '\n'.join(f'{k.capitalize()}: {v}' for k, v in card.items() if v),
      'space': json.dumps(space),
      'history': '\n'.join(json.dumps(h) for h in history) or '(none yet)',
      'n_trials': n_trials, 'budget': budget, 'trials_left': max(1, budget - n_trials),
      'metric': metric, 'direction': direction, 'answer_format': answer_format(space)}
  return [{'role': 'system', 'content': SYSTEM},
          {'role': 'user', 'content': template.format(**fields)}]


def task_card(card: Mapping[str, str], metric: str, direction: str,
              budget: int) -> dict[str, str]:
  """The card with its blank fields filled from the sweep and this machine."""
  device = jax.devices()[0]
  hardware = f'{os.cpu_count()} CPU cores'
  if device.platform != 'cpu':
    hardware = f'{jax.device_count()} x {device.device_kind}, {hardware}'
  filled = {'metric': f'{metric} ({direction})', 'budget': f'{budget} trials',
            'hardware': hardware}
  return {k: v or filled.get(k, '') for k, v in card.items()}


def answer_format(space: Mapping[str, dict]) -> str:
  """The answer's shape, with a <type> where each value goes (numbers unquoted)."""
  slots = ', '.join(f'{json.dumps(name)}: <{d["type"]}>' for name, d in space.items())
  return '{"params": {' + slots + '}, "reason": "<one sentence: why this configuration>"}'



def history(trials: Sequence[FrozenTrial], best: int, recent: int,
            maximize: bool) -> list[dict[str, Any]]:
  """The `best` complete trials (best first), then the `recent` latest others."""
  complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
  ranked = sorted(complete, key=lambda t: t.value, reverse=maximize)[:best]
  shown = {t.number for t in ranked}
  latest = [t for t in sorted(trials, key=lambda t: -t.number) if t.number not in shown][:recent]
  return [_line(t) for t in ranked + latest]


def _line(trial: FrozenTrial) -> dict[str, Any]:
  line = {'trial': trial.number, 'params': trial.params, 'state': trial.state.name.lower()}
  if trial.state == TrialState.COMPLETE:
    line['value'] = trial.value if _finite(trial.value) else 'diverged'
  elif trial.intermediate_values:  # pruned (or running): the last value it reported
    step = max(trial.intermediate_values)
    line['last_reported'] = {'step': step, 'value': trial.intermediate_values[step]}
  seconds = trial.user_attrs.get('seconds')
  if seconds is not None:
    line['seconds'] = round(seconds, 1)
  return line


def _finite(value: float | None) -> bool:
  return value is not None and math.isfinite(value)
