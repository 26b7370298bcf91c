"""A sweep's search space: which fields of the base config a trial changes, and how.

`config.sweep.space` mirrors the base config. The leaf at `optim.lr` is a tuple that says how
the base's field `optim.lr` is searched:

  ('float', low, high)            uniform in [low, high]; ('float', low, high, 'log') log-uniform
  ('int', low, high)              an integer in [low, high]; ('int', low, high, step) on a
                                  step; ('int', low, high, 'log') log-uniform
  ('categorical', (a, b, ...))    one of the values (None, bool, int, float or str)
  ()                              not searched

Tuples, not a string language ('loguniform(1e-5, 1e-3)'), because they are what
ml_collections already parses and type-checks on a command line, so one entry can be
narrowed or dropped there: `--config.sweep.space.optim.lr="('float', 1e-5, 1e-3, 'log')"`,
`--config.sweep.space.optim.weight_decay="()"`.

Named variants (an ablation): `config.sweep.variants.<name>` mirrors the base config the same
way with plain values, the overrides that make that variant (an empty section = the base as
it is). With variants, a trial also chooses one, as the categorical parameter 'variant'.

Every entry is checked against the base config before anything runs: a path it does not
have, low > high, a value of the wrong type. Optuna's parameter names are the dotted paths
('optim.lr'), so the study, its plots and the report name fields as a command line does.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import optuna

VARIANT = 'variant'  # the Optuna parameter that picks a named variant
_KINDS = ('float', 'int', 'categorical')
_CATEGORICAL_TYPES = (type(None), bool, int, float, str)  # what Optuna stores


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched field: its path in the base config and its distribution."""
  path: str
  kind: str                    # 'float' | 'int' | 'categorical'
  low: float = 0.0
  high: float = 0.0
  log: bool = False
  step: int = 1                # 'int' only
  choices: tuple = ()          # 'categorical' only
  base: Any = None             # the base config's value (what a run uses untuned)

  def suggest(self, trial: optuna.Trial) -> Any:
    if self.kind == 'float':
      return trial.suggest_float(self.path, self.low, self.high, log=self.log)
    if self.kind == 'int':
      return trial.suggest_int(self.path, self.low, self.high, step=self.step, log=self.log)
    return trial.suggest_categorical(self.path, self.choices)

  def distribution(self) -> optuna.distributions.BaseDistribution:
    """The distribution `suggest` draws from (a sampler that proposes whole trials needs it)."""
    if self.kind == 'float':
      return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)
    if self.kind == 'int':
      return optuna.distributions.IntDistribution(self.low, self.high, log=self.log,
                                                  step=self.step)
    return optuna.distributions.CategoricalDistribution(self.choices)

  def describe(self) -> dict[str, Any]:
    """The dimension as JSON-ready facts (for the LLM advisor's prompt)."""
    if self.kind == 'categorical':
      facts = {'type': 'categorical', 'choices': list(self.choices)}
    else:
      facts = {'type': self.kind, 'low': _short(self.low), 'high': _short(self.high)}
      if self.log:
        facts['log'] = True
      if self.kind == 'int' and self.step != 1:
        facts['step'] = self.step
    if self.base is not None:
      facts['base'] = list(self.base) if isinstance(self.base, tuple) else self.base
    return facts

  def grid_values(self) -> list:
    if self.kind == 'categorical':
      return list(self.choices)
    if self.kind == 'int' and not self.log:
      return list(range(self.low, self.high + 1, self.step))
    raise ValueError(f'config.sweep.space.{self.path}: a grid needs listed values; write '
                     f"('categorical', (value, ...)) instead of a {self.kind} range")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """The searched fields and the named variants (name -> {path: value})."""
  dimensions: tuple[Dimension, ...]
  variants: Mapping[str, Mapping[str, Any]]

  @classmethod
  def from_config(cls, space: ml_collections.ConfigDict, variants: ml_collections.ConfigDict,
                  base: ml_collections.ConfigDict) -> SearchSpace:
    dimensions = tuple(
        d for path, spec, base_value in _leaves(space, base, 'config.sweep.space')
        if (d := _dimension(path, spec, base_value)) is not None)
    named = {}
    for name in variants:
      field = f'config.sweep.variants.{name}'
      if not isinstance(variants[name], Mapping | ml_collections.ConfigDict):
        raise ValueError(  # noqa: TRY004  (bad config input, like every other: ValueError)
            f'{field}: a section of base config fields, not {variants[name]!r}')
      named[name] = {path: _typed(f'{field}.{path}', value, base_value, path)
                     for path, value, base_value in _leaves(variants[name], base, field)}
      searched = sorted(set(named[name]) & {d.path for d in dimensions})
      if searched:
        raise ValueError(f'{field} sets {", ".join(searched)}, which config.sweep.space '
                         f'searches; drop one of the two')
    return cls(dimensions, named)

  def grid(self) -> dict[str, list]:
    """Every parameter's values, for Optuna's GridSampler (one trial per combination)."""
    grid = {d.path: d.grid_values() for d in self.dimensions}
    if self.variants:
      grid[VARIANT] = list(self.variants)
    return grid

  def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every Optuna parameter of a trial ('variant' first, as `suggest` asks for it)."""
    found = {}
    if self.variants:
      found[VARIANT] = optuna.distributions.CategoricalDistribution(list(self.variants))
    found.update({d.path: d.distribution() for d in self.dimensions})
    return found

  def describe(self) -> dict[str, dict[str, Any]]:
    """Every parameter as JSON-ready facts: type, bounds or choices, scale, base value."""
    found = {}
    if self.variants:
      found[VARIANT] = {'type': 'categorical', 'choices': list(self.variants),
                        'meaning': {name: dict(o) for name, o in self.variants.items()}}
    found.update({d.path: d.describe() for d in self.dimensions})
    return found

  def suggest(self, trial: optuna.Trial) -> tuple[str | None, dict[str, Any]]:
    """(variant or None, {path: value}): the trial's overrides of the base config. A trial
    retried after its worker died gets its original values back (Optuna keeps them)."""
    variant = trial.suggest_categorical(VARIANT, list(self.variants)) if self.variants else None
    overrides = dict(self.variants[variant]) if variant is not None else {}
    overrides.update({d.path: d.suggest(trial) for d in self.dimensions})
    return variant, overrides


def _short(x: float) -> float:
  """`x` to 10 significant digits (0.009, not 0.009000000000000001)."""
  return type(x)(float(f'{x:.10g}'))


def apply(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
          ) -> ml_collections.ConfigDict:
  """A copy of `base` with each dotted path set to its value (the base is left as it is)."""
  config = copy.deepcopy(base)
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def _leaves(tree: Mapping, base: Any, field: str, prefix: str = ''
            ) -> Iterator[tuple[str, Any, Any]]:
  """(path, value, the base's value there) for each leaf of `tree`, which mirrors `base`:
  sections are followed as long as the base has a section at the same path."""
  for key in tree:
    path, value = prefix + key, tree[key]
    if not isinstance(base, Mapping | ml_collections.ConfigDict) or key not in base:
      raise ValueError(f'{field}.{path}: the base config has no field {path}')
    if (isinstance(value, Mapping | ml_collections.ConfigDict)
        and isinstance(base[key], Mapping | ml_collections.ConfigDict)):
      yield from _leaves(value, base[key], field, path + '.')
    else:
      yield path, value, base[key]


def _dimension(path: str, spec: Any, base_value: Any) -> Dimension | None:
  """The Dimension a space entry describes, or None for an entry that is switched off."""
  field = f'config.sweep.space.{path}'
  spec = tuple(spec) if isinstance(spec, tuple | list) else (spec,)
  if spec in ((), (None,)):
    return None
  kind, *rest = spec
  if kind not in _KINDS:
    raise ValueError(f'{field}: unknown kind {kind!r} in {spec!r}; choose from {list(_KINDS)}')
  if kind == 'categorical':
    if len(rest) != 1 or not isinstance(rest[0], tuple | list) or not rest[0]:
      raise ValueError(f"{field}: write ('categorical', (value, ...)), not {spec!r}")
    for value in rest[0]:
      if not isinstance(value, _CATEGORICAL_TYPES):
        raise ValueError(  # noqa: TRY004  (bad config input, like every other: ValueError)
            f'{field}: {value!r} cannot be a categorical value (None, bool, int, float or str)')
    return Dimension(path, kind, choices=tuple(_typed(field, v, base_value, path)
                                               for v in rest[0]), base=base_value)
  return _range(field, path, kind, rest, base_value)


def _range(field: str, path: str, kind: str, rest: list, base_value: Any) -> Dimension:
  """A 'float' or 'int' entry: (low, high) and an optional 'log', 'linear' or int step."""
  number = int if kind == 'int' else (int, float)
  if len(rest) not in (2, 3) or not all(
      isinstance(x, number) and not isinstance(x, bool) for x in rest[:2]):
    raise ValueError(f"{field}: write ('{kind}', low, high) with {kind} bounds, optionally "
                     f"followed by 'log'{' or a step' if kind == 'int' else ''}; got "
                     f'{(kind, *rest)!r}')
  low, high = rest[:2]
  option = rest[2] if len(rest) == 3 else 'linear'
  step_given = kind == 'int' and isinstance(option, int) and not isinstance(option, bool)
  if option not in ('log', 'linear') and not (step_given and option > 0):
    raise ValueError(f"{field}: the third entry is 'log' or 'linear'"
                     f"{' or a positive step' if kind == 'int' else ''}, not {option!r}")
  if low > high:
    raise ValueError(f'{field}: low {low} > high {high}')
  if option == 'log' and low <= 0:
    raise ValueError(f'{field}: a log range needs low > 0, not {low}')
  _typed(field, high if kind == 'int' else float(high), base_value, path)
  return Dimension(path, kind, low, high, log=option == 'log',
                   step=option if step_given else 1, base=base_value)


def _typed(field: str, value: Any, base_value: Any, path: str) -> Any:
  """`value` as the base field's type would take it, or a one-line error naming `field`."""
  if base_value is None:
    return value
  if isinstance(base_value, bool):
    fits = isinstance(value, bool)
  elif isinstance(base_value, int):
    fits = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(base_value, float):
    fits = isinstance(value, int | float) and not isinstance(value, bool)
  elif isinstance(base_value, tuple | list):
    fits, value = isinstance(value, tuple | list), tuple(value) if isinstance(
        value, tuple | list) else value
  else:
    fits = isinstance(value, type(base_value))
  if not fits:
    raise ValueError(f'{field}: {value!r} is not a {type(base_value).__name__}, the type of '
                     f'the base config field {path}')
  return float(value) if isinstance(base_value, float) else value
