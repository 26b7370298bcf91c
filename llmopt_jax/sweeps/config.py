"""A sweep's settings, `config.sweep`, read once into a typed record before anything runs.

A sweep config holds the config it searches over whole, as `config.base` (built from the base
config file when the sweep config is built, so the sweep's config.json records it and a rerun
that changes it is refused), and `config.sweep`: the sampler, the pruner, the trial budget,
the seeds of every trial, the metric and its direction, the storage, the search space and the
named variants (`sweeps/space.py`). Every bad value is a one-line error naming its field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from llmopt_jax import checks
from llmopt_jax.sweeps import llm_config, proposals
from llmopt_jax.sweeps import space as space_lib

SAMPLERS = ('tpe', 'random', 'grid', 'cmaes', 'gp', 'qmc', *llm_config.LLM_SAMPLERS)
PRUNERS = ('none', 'median', 'hyperband')
DIRECTIONS = ('minimize', 'maximize')
# Samplers that need a package the project does not install, and why it is not installed.
_NEEDS = {'gp': ('torch', ("Optuna's GP sampler is written in PyTorch, which this project "
                           'installs for its tests only (requirements-test.txt)')),
          'cmaes': ('cmaes', 'it is the CMA-ES implementation Optuna calls')}
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs')


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  base_config: str             # the --config value that builds config.base ('file.py:arg')
  sampler: str
  pruner: str
  trials: int                  # the study's budget of finished trials (0 with grid: the grid)
  seeds: tuple[int, ...]       # every trial runs once per seed (the base's `seed` field)
  metric: str                  # 'eval/<name>' (last evaluation) or 'test/<name>' (report.json)
  direction: str
  storage: str                 # '' = SQLite in the workdir, or a database URL
  study_name: str
  sampler_seed: int            # -1 = unseeded
  space: space_lib.SearchSpace
  baseline: str                # the variant others are compared with ('' = none)
  pruner_startup_trials: int   # median: trials that finish before any is pruned
  pruner_warmup_steps: int     # steps of each trial before it may be pruned (both pruners)
  heartbeat_s: int             # a worker silent for 3 heartbeats is dead: its trial is retried
  max_retries: int             # how often one trial is retried after its worker died
  max_resource: int            # hyperband: the base's train.num_steps (0 = Optuna's 'auto')
  min_resource: int            # hyperband: the first evaluation not before
                               # pruner_warmup_steps (0 = 'auto')
  startup_trials: int = 10     # tpe/gp/cmaes: random trials before the model is used
  enqueue_base: bool = False   # trial 0 runs the base config's own values
  llm: llm_config.LlmConfig | None = None  # samplers llm and llm_warm_start only

  @property
  def variants(self) -> Mapping[str, Mapping[str, Any]]:
    return self.space.variants

  @property
  def budget(self) -> int:
    """Finished trials the study runs to (its workers together)."""
    return self.trials or _grid_size(self.space.grid())

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> SweepConfig:
    sweep, base = config.sweep, config.base
    checks.choice('config.sweep.sampler', sweep.sampler, SAMPLERS)
    checks.choice('config.sweep.pruner', sweep.pruner, PRUNERS)
    checks.choice('config.sweep.direction', sweep.direction, DIRECTIONS)
    _needs_package(sweep.sampler)
    for name in ('seeds', 'heartbeat_s'):
      checks.int_at_least(f'config.sweep.{name}', sweep[name], 1)
    for name in ('trials', 'max_retries', 'pruner_startup_trials', 'pruner_warmup_steps',
                 'startup_trials'):
      checks.int_at_least(f'config.sweep.{name}', sweep[name], 0)
    if sweep.seeds > 1 and 'seed' not in base:
      raise ValueError(f'config.sweep.seeds={sweep.seeds}: the base config has no `seed` field '
                       f'to vary')
    if not sweep.metric.startswith(('eval/', 'test/')):
      raise ValueError(f"config.sweep.metric={sweep.metric!r}: 'eval/<name>' (a run's last "
                       f"evaluation) or 'test/<name>' (its report.json), e.g. 'eval/accuracy'")
    if sweep.storage and '://' not in sweep.storage:
      raise ValueError(f'config.sweep.storage={sweep.storage!r} is not a database URL '
                       f"(sqlite:///path.db, postgresql://user@host:port/db); '' = a SQLite "
                       f'file in the workdir')
    space = space_lib.SearchSpace.from_config(sweep.space, sweep.variants, base)
    if not space.dimensions and not space.variants:
      raise ValueError('config.sweep.space searches no field and config.sweep.variants is '
                       'empty: there is nothing to compare')
    if sweep.baseline and sweep.baseline not in space.variants:
      raise ValueError(f'config.sweep.baseline={sweep.baseline!r} is not a variant; choose '
                       f'from {list(space.variants)}')
    _check_budget(sweep.sampler, sweep.trials, space)
    enqueue_base = bool(sweep.get('enqueue_base', False))
    if enqueue_base:
      base_params(space, sweep.baseline)  # raises for a base value outside its searched range
    llm = (llm_config.LlmConfig.from_config(sweep.llm, sweep.sampler)
           if sweep.sampler in llm_config.LLM_SAMPLERS else None)
    train = base.get('train', {})
    return cls(
        base_config=sweep.base_config, sampler=sweep.sampler, pruner=sweep.pruner,
        trials=sweep.trials, seeds=tuple(base.get('seed', 0) + k for k in range(sweep.seeds)),
        metric=sweep.metric, direction=sweep.direction, storage=sweep.storage,
        study_name=sweep.study_name, sampler_seed=sweep.sampler_seed, space=space,
        baseline=sweep.baseline, pruner_startup_trials=sweep.pruner_startup_trials,
        pruner_warmup_steps=sweep.pruner_warmup_steps, heartbeat_s=sweep.heartbeat_s,
        max_retries=sweep.max_retries, max_resource=train.get('num_steps', 0),
        min_resource=_first_rung(train.get('eval_every', 0), sweep.pruner_warmup_steps),
        startup_trials=sweep.startup_trials,
        enqueue_base=enqueue_base, llm=llm)


def _first_rung(eval_every: int, warmup_steps: int) -> int:
  """Hyperband's smallest resource: the first evaluation at or after `warmup_steps`, so
  that, as with the median pruner, no trial is judged before it (e.g. inside a learning-rate
  warmup, where a slow start says little about the end)."""
  if eval_every <= 0:
    return 0
  return eval_every * max(1, math.ceil(warmup_steps / eval_every))


def base_params(space: space_lib.SearchSpace, baseline: str = '') -> dict[str, Any]:
  """The trial parameters that run the base config as it is (its values of the searched
  fields; the baseline variant, else the first), checked to lie in the space."""
  params = {}
  if space.variants:
    params[space_lib.VARIANT] = baseline or next(iter(space.variants))
  for dim in space.dimensions:
    try:
      params[dim.path] = proposals.checked_value(dim, dim.base)
    except proposals.Rejected as e:
      raise ValueError(f'config.sweep.enqueue_base: the base value {e}; widen '
                       f'config.sweep.space.{dim.path} or turn enqueue_base off') from None
  return params


def base_config_file(name: str) -> str:
  """The file of base config `name`: a path to a config file, or a name under configs/."""
  if os.path.isfile(name):
    return name
  if '/' not in name and os.path.isfile(os.path.join(_CONFIGS, f'{name.removesuffix(".py")}.py')):
    return f'configs/{name.removesuffix(".py")}.py'
  raise ValueError(f'config argument base={name!r}: no such config file (a path, or a name '
                   f'under configs/ such as finetune)')


def load_base(spec: str) -> ml_collections.ConfigDict:
  """The config `--config=<spec>` builds: `get_config(arg)` of the file before the colon."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):  # configs/<name>.py, from anywhere
    path = os.path.join(os.path.dirname(_CONFIGS), path)
  module_spec = importlib.util.spec_from_file_location('llmopt_sweep_base', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _grid_size(grid: Mapping[str, list]) -> int:
  size = 1
  for values in grid.values():
    size *= len(values)
  return size


def _check_budget(sampler: str, trials: int, space: space_lib.SearchSpace) -> None:
  if sampler != 'grid':
    if trials == 0:
      raise ValueError(f'config.sweep.trials=0: give the number of trials (0 = the whole '
                       f'grid, for sampler=grid only; this is sampler={sampler})')
    return
  size = _grid_size(space.grid())  # raises for a range a grid cannot list
  if trials > size:
    raise ValueError(f'config.sweep.trials={trials} exceeds the grid\'s {size} points; give '
                     f'at most {size}, or 0 for the whole grid')


def _needs_package(sampler: str) -> None:
  if sampler in _NEEDS and importlib.util.find_spec(_NEEDS[sampler][0]) is None:
    package, why = _NEEDS[sampler]
    raise ValueError(f'config.sweep.sampler={sampler!r} needs the Python package {package} '
                     f'({why}); install it (pip install {package}) or choose another sampler')
