"""An LLM's proposal read as data and checked against the search space, never trusted.

The answer must be one JSON object, `{"params": {...}, "reason": "..."}` (a single ```json
fence around it is tolerated, since chat models add one even when told not to; nothing else
is). `params` must name every parameter of the space and no other, each of the right type
and inside its range: a float a JSON number within [low, high]; an int a JSON integer within
[low, high] on the step; a categorical exactly one of the choices (1 is not '1' nor True).
A proposal equal to a trial already in the study is refused too. Each refusal is a
`Rejected` whose one-line message is sent back to the model, so it can correct itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial

from llmopt_jax.sweeps import space as space_lib

_FENCE = re.compile(r'^```(?:json)?\s*\n(.*)\n\s*```$', re.DOTALL)


class Rejected(ValueError):
  """A proposal that cannot be used; the message says why, in one line."""


def parse(text: str, space: space_lib.SearchSpace) -> tuple[dict[str, Any], str]:
  """(params, reason) of the answer `text`, typed as the space's suggest() would give them."""
  params, reason = _read(text)
  wanted = space.distributions()
  unknown = sorted(set(params) - set(wanted))
  if unknown:
    raise Rejected(f'unknown parameter {unknown[0]!r}; the parameters are {list(wanted)}')
  missing = [name for name in wanted if name not in params]
  if missing:
    raise Rejected(f'parameter {missing[0]!r} is missing; give every one of {list(wanted)}')
  dims = {d.path: d for d in space.dimensions}
  typed = {}
  for name in wanted:
    if name == space_lib.VARIANT:
      typed[name] = _choice(name, params[name], tuple(space.variants))
    else:
      typed[name] = checked_value(dims[name], params[name])
  return typed, reason


def check_new(params: dict[str, Any], trials: Sequence[FrozenTrial], number: int) -> None:
  """Rejects `params` when another trial of the study has exactly these values."""
  for trial in trials:
    if trial.number != number and trial.params == params:
      raise Rejected(f'this configuration is the same as trial {trial.number}; propose one '
                     f'not tried yet')


def _read(text: str) -> tuple[dict[str, Any], str]:
  text = text.strip()
  if not text:
    raise Rejected('the answer is empty; answer with one JSON object')
  fenced = _FENCE.match(text)
  try:
    answer = json.loads(fenced.group(1) if fenced else text)
  except json.JSONDecodeError as e:
    raise Rejected(f'the answer is not valid JSON ({e.msg} at line {e.lineno} column '
                   f'{e.colno}); answer with one JSON object and nothing else') from None
  if not isinstance(answer, dict):
    raise Rejected(f'the answer is a JSON {type(answer).__name__}, not an object with '
                   f'"params" and "reason"')
  params = answer.get('params')
  if not isinstance(params, dict):
    raise Rejected('the answer has no "params" object; write {"params": {...}, "reason": ...}')
  reason = answer.get('reason', '')
  return params, reason if isinstance(reason, str) else json.dumps(reason)


def checked_value(dim: space_lib.Dimension, value: Any) -> Any:
  """`value` typed for `dim`, or Rejected when it is not a value `dim` can take."""
  if dim.kind == 'categorical':
    return _choice(dim.path, value, dim.choices)
  number = _number(dim, value)
  if dim.kind == 'float':  # a bound written back with fewer digits than it has is the bound
    slack = 1e-9 * max(abs(dim.low), abs(dim.high))
    number = min(max(number, dim.low), dim.high) if (
        dim.low - slack <= number <= dim.high + slack) else number
  if not dim.low <= number <= dim.high:
    raise Rejected(f'{dim.path}={value!r} is outside [{dim.low}, {dim.high}]')
  if dim.kind == 'int' and (number - dim.low) % dim.step:
    raise Rejected(f'{dim.path}={value!r} is not on the step: {dim.low} + a multiple of '
                   f'{dim.step}')
  return number


def _number(dim: space_lib.Dimension, value: Any) -> int | float:
  if dim.kind == 'int':
    if not isinstance(value, int) or isinstance(value, bool):
      raise Rejected(f'{dim.path}={value!r} is not an integer (a JSON number without a '
                     f'fraction)')
    return value
  if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
    raise Rejected(f'{dim.path}={value!r} is not a finite number')
  return float(value)


def _choice(name: str, value: Any, choices: tuple) -> Any:
  """The choice equal to `value` and of its type (a whole number may stand for a float)."""
  for choice in choices:
    same_type = type(choice) is type(value) or (type(choice) is float and type(value) is int)
    if same_type and choice == value:
      return choice
  raise Rejected(f'{name}={value!r} is not one of the choices {list(choices)}')
