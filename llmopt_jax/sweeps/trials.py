"""One Optuna trial of a sweep: an ordinary run (or one per seed) of the base config with the
trial's overrides, in `<sweep workdir>/trials/<number>/`, and its metric as the objective.

Layout: with one seed the trial's workdir is the run's workdir; with several, each seed runs
in `trials/<number>/seed<seed>/` (the seed set in the base config's `seed` field) and the
objective is the mean over seeds. A trial retried after its worker died keeps its original
number's workdir (Optuna copies the trial's user_attrs into the retry), so each run resumes
from its last checkpoint, and a seed that had finished is not trained again.

Pruning watches the first seed's run: its evaluations go to `trial.report` through
`train/reporting.py`, and when the pruner says so the run stops cleanly (no summary.json,
its checkpoint kept) and the trial ends PRUNED; later seeds run only for trials that survive.

The metric is read from the finished run's files, so a trial's value is what its workdir
says: 'eval/<name>' from summary.json's last evaluation (`final_eval`), 'test/<name>' from
report.json (the test split scored on the best checkpoint, e.g. a fine-tune's accuracy).

What the report reads, as trial user_attrs: 'overrides' {path: value}, 'variant' (or None),
'workdir' (relative to the sweep's), 'seeds', 'values' (one per finished seed), 'seconds',
'command' (the one-line main.py command that reruns the trial, its first seed's with seeds),
and 'error' for a run that diverged. The run function is given by the stage (the stage
registry's `run`), so this module never imports a stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import optuna

from llmopt_jax import workdir as workdir_lib
from llmopt_jax.sweeps import space as space_lib
from llmopt_jax.sweeps.config import SweepConfig
from llmopt_jax.train import reporting
from llmopt_jax.train.window import NonFiniteError

RunFn = Callable[[ml_collections.ConfigDict, str], Any]
TRIALS = 'trials'


@dataclasses.dataclass(frozen=True)
class Objective:
  """Optuna's objective for a sweep: runs a trial, returns its metric (mean over seeds)."""
  sweep: SweepConfig
  base: ml_collections.ConfigDict   # the config searched over (config.base)
  defaults: ml_collections.ConfigDict  # what `--config=<sweep.base_config>` builds alone
  workdir: str                      # the sweep's
  run: RunFn

  def __call__(self, trial: optuna.Trial) -> float:
    variant, overrides = self.sweep.space.suggest(trial)
    relative = trial.user_attrs.get('workdir') or os.path.join(TRIALS, str(trial.number))
    runs = self._runs(space_lib.apply(self.base, overrides), relative)
    _set(trial, overrides=overrides, variant=variant, workdir=relative,
         seeds=list(self.sweep.seeds),
         command=command(self.sweep.base_config, self.defaults, *runs[0]))
    started, values = time.perf_counter(), []
    try:
      for k, (run_config, run_dir) in enumerate(runs):
        watch = _pruning_watch(trial, self.sweep.metric, run_config) if k == 0 else None
        values.append(self._run(run_config, run_dir, watch))
        _set(trial, values=values)
    except NonFiniteError as e:  # these values diverge: a result (FAIL), not a fault to retry
      _set(trial, error=str(e))
      return math.nan
    finally:
      _set(trial, seconds=time.perf_counter() - started)
    return sum(values) / len(values)

  def _runs(self, config: ml_collections.ConfigDict, relative: str
            ) -> list[tuple[ml_collections.ConfigDict, str]]:
    """(config, workdir) of each seed's run: the trial's workdir itself for one seed."""
    several = len(self.sweep.seeds) > 1
    return [(space_lib.apply(config, {'seed': seed} if 'seed' in config else {}),
             os.path.join(self.workdir, relative, *([f'seed{seed}'] if several else [])))
            for seed in self.sweep.seeds]

  def _run(self, config: ml_collections.ConfigDict, run_dir: str,
           watch: reporting.Watcher | None) -> float:
    try:
      with reporting.on_eval(watch) if watch else contextlib.nullcontext():
        self.run(config, run_dir)
    except reporting.StopRun as e:
      raise optuna.TrialPruned(str(e)) from None
    finally:
      workdir_lib.release(run_dir)  # the trial can be rerun alone while this worker goes on
    return read_metric(run_dir, self.sweep.metric)


def _pruning_watch(trial: optuna.Trial, metric: str,
                   config: ml_collections.ConfigDict) -> reporting.Watcher:
  """Reports each evaluation of `metric` (or, for a test metric, its validation twin) to the
  trial; stops the run when the pruner says so, except at its last step (it has finished)."""
  key = 'eval/' + metric.split('/', 1)[-1]
  last_step = config.get('train', {}).get('num_steps', 0)

  def watch(step: int, metrics: Mapping[str, float]) -> None:
    if key not in metrics:
      return
    with warnings.catch_warnings():  # a resumed run redoes steps the trial already has
      warnings.filterwarnings('ignore', message='The reported value is ignored')
      trial.report(float(metrics[key]), step)
    if step < last_step and trial.should_prune():
      raise reporting.StopRun(f'pruned: {key}={metrics[key]:.4f} at step {step}')
  return watch


def read_metric(run_dir: str, metric: str) -> float:
  """`metric` of the finished run in `run_dir` (see the module docstring)."""
  split, _, name = metric.partition('/')
  if split == 'test':
    path = os.path.join(run_dir, 'report.json')
    found = _read(path)
    value = found.get(name)
  else:
    path = os.path.join(run_dir, 'summary.json')
    found = _read(path).get('final_eval') or {}
    value = found.get(metric)
  if not isinstance(value, int | float) or isinstance(value, bool):
    known = sorted(k for k, v in found.items() if isinstance(v, int | float))
    prefix = 'test/' if split == 'test' else ''
    raise ValueError(f'config.sweep.metric={metric!r} is not in {path} (it has: '  # noqa: TRY004
                     f'{", ".join(prefix + k for k in known) or "nothing"})')
  return float(value)


def command(base_config: str, defaults: ml_collections.ConfigDict,
            config: ml_collections.ConfigDict, workdir: str) -> str:
  """The one-line `python main.py ...` that runs `config` in `workdir`: the base config file
  and every field where `config` differs from what that file builds."""
  want, have = _flat(config), _flat(defaults)
  overrides = [f'--config.{path}={_text(value)}' for path, value in sorted(want.items())
               if path in have and have[path] != value]
  return shlex.join(['python', 'main.py', f'--config={base_config}', *overrides,
                     f'--workdir={workdir}'])


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping | ml_collections.ConfigDict):
    return {path: value for key in tree
            for path, value in _flat(tree[key], f'{prefix}{key}.').items()}
  return {prefix.rstrip('.'): tree}


def _text(value: Any) -> str:
  """A value as ml_collections parses it back from a command line."""
  return value if isinstance(value, str) else repr(value)


def _set(trial: optuna.Trial, **attrs: Any) -> None:
  for key, value in attrs.items():
    trial.set_user_attr(key, value)


def _read(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)
