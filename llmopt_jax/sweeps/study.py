"""The Optuna study a sweep's workers share, and the loop each worker runs.

**Storage.** `config.sweep.storage` '' = a SQLite file, `<workdir>/study.db`; any database URL
(`postgresql://user@host:5432/db`, `sqlite:///path.db`) for workers on several machines. SQLite
rather than Optuna's journal file, by experiment: 8 local processes hammering one study (ask,
three suggestions, five reports with pruning checks, tell, and a heartbeat every 20 ms each;
480 trials) ran with no error once each connection waits for the database lock instead of
failing at once ('database is locked' comes from SQLite's 5 s default busy timeout; we wait
60 s), and the journal file was slower (44 s vs 31 s for 360 trials) and, decisively, keeps
no heartbeats: Optuna cannot tell a dead worker's trial from a running one there. What did
break was creating the schema: 5 of 6 processes opening a new SQLite file at once failed
('table studies already exists'), so opening the storage and creating the study are
serialized by a file lock in the workdir.

**Workers.** Any number of processes run the same command on the same workdir (and storage).
Each claims a trial under that file lock: a trial waiting to be retried first, else a new
one while the study holds fewer than its budget, so workers together run exactly
`sweep.budget` trials (`study.optimize` with MaxTrialsCallback would stop each worker only
after its own trial, overshooting by up to one per worker, and a grid would repeat points).
Workers on several machines should share the workdir (a network file system), as trials
are resumed from their checkpoints there; without it the budget may overshoot.

**Faults.** Each running trial has a heartbeat in the database. A trial whose worker is silent
for three heartbeats is failed by the next worker that claims one and queued again with the
same parameters and workdir (Optuna's RetryHeartbeatStaleTrialCallback), so it resumes from
its last checkpoint; the same happens to a trial stopped by Ctrl-C or an error, for a rerun.
A worker that finds no trial to claim waits while others run (one of them may die, leaving
a trial to retry), then returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from llmopt_jax import cli, report
from llmopt_jax.sweeps import config as sweep_config
from llmopt_jax.sweeps import llm_config
from llmopt_jax.sweeps.config import SweepConfig

STUDY_DB = 'study.db'
CLAIM_LOCK = 'claim.lock'
GRACE_HEARTBEATS = 3
_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker prints its own trial lines


def open_study(sweep: SweepConfig, workdir: str) -> optuna.Study:
  """The sweep's study, created on first use and loaded by every later worker."""
  storage = _storage(sweep, workdir)
  with workers_lock(workdir):
    study = optuna.create_study(storage=storage, study_name=sweep.study_name,
                                direction=sweep.direction, load_if_exists=True)
    _check_same_sweep(study, sweep, sweep.storage or storage.url)
    worker = study.user_attrs.get('workers', 0)
    study.set_user_attr('workers', worker + 1)
    if sweep.enqueue_base and worker == 0 and not study.get_trials(deepcopy=False):
      study.enqueue_trial(sweep_config.base_params(sweep.space, sweep.baseline))
  study.sampler = make_sampler(sweep, worker)
  study.pruner = make_pruner(sweep)
  return study


def _check_same_sweep(study: optuna.Study, sweep: SweepConfig, url: str) -> None:
  """Refuses to join a study that another sweep made (a database shared by many sweeps,
  each of which must name its own study); records what defines this one on first use."""
  this = json.loads(json.dumps({
      'base_config': sweep.base_config, 'metric': sweep.metric, 'direction': sweep.direction,
      'space': [dataclasses.asdict(d) for d in sweep.space.dimensions],
      'variants': sweep.variants, 'seeds': sweep.seeds}, default=str))
  recorded = study.user_attrs.get('sweep')
  if recorded is None:
    study.set_user_attr('sweep', this)
  elif recorded != this:
    differ = ', '.join(k for k in this if recorded.get(k) != this[k])
    raise ValueError(f'config.sweep.study_name={sweep.study_name!r}: the study of that name in '
                     f'{shown_url(url)} belongs to another sweep (it differs in {differ}); '
                     f'give this sweep another study_name')


def storage_url(sweep: SweepConfig, workdir: str) -> str:
  return sweep.storage or f'sqlite:///{os.path.abspath(os.path.join(workdir, STUDY_DB))}'


def shown_url(url: str) -> str:
  """`url` with its password, if any, as '***': for messages and logs."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except sqlalchemy.exc.ArgumentError:
    return url


def _storage(sweep: SweepConfig, workdir: str) -> optuna.storages.RDBStorage:
  """The study's database, reached (or a one-line error naming config.sweep.storage)."""
  url = storage_url(sweep, workdir)
  if url.startswith('postgresql://'):  # SQLAlchemy 2.1 would take psycopg 3; we install psycopg2
    url = 'postgresql+psycopg2://' + url.removeprefix('postgresql://')
  dialect = url.partition(':')[0].partition('+')[0]
  connect = {'sqlite': {'timeout': 60}, 'postgresql': {'connect_timeout': 10}}.get(dialect, {})
  try:
    with workers_lock(workdir), _quiet():
      retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
          max_retry=sweep.max_retries, inherit_intermediate_values=True)
      return optuna.storages.RDBStorage(
          url, engine_kwargs={'connect_args': connect}, heartbeat_interval=sweep.heartbeat_s,
          grace_period=GRACE_HEARTBEATS * sweep.heartbeat_s,
          heartbeat_stale_trial_callback=retry)
  except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
    reason = cli.one_line(str(e).split('\n(Background')[0])[:300]
    raise ValueError(f'config.sweep.storage={shown_url(sweep.storage or url)!r}: cannot open '
                     f'the study database ({type(e).__name__}: {reason})') from None


def make_sampler(sweep: SweepConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
  """The sampler by name. Each worker seeds it differently (sampler_seed + its number), so
  concurrent workers do not propose the same points; a grid's order is the same in all."""
  seed = None if sweep.sampler_seed < 0 else sweep.sampler_seed
  if sweep.sampler in llm_config.LLM_SAMPLERS:
    from llmopt_jax.sweeps import llm_sampler  # its HTTP client, for these samplers only
    return llm_sampler.make_sampler(sweep, worker)
  if sweep.sampler == 'grid':
    return _Grid(sweep.space.grid(), seed=seed)
  seed = None if seed is None else seed + worker
  startup = sweep.startup_trials
  with _quiet():
    return {
        'random': lambda: optuna.samplers.RandomSampler(seed=seed),
        'tpe': lambda: tpe(seed, startup),
        'cmaes': lambda: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup),
        'gp': lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
        'qmc': lambda: optuna.samplers.QMCSampler(seed=seed),
    }[sweep.sampler]()


def tpe(seed: int | None, startup_trials: int) -> optuna.samplers.TPESampler:
  """TPE with `startup_trials` random ones first; constant_liar: running trials count as bad
  guesses, so concurrent workers spread out."""
  with _quiet():
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=startup_trials)


class _Grid(optuna.samplers.GridSampler):
  """Optuna's grid without its `study.stop()` after the last point, which only
  `study.optimize` allows: here the worker loop stops at the budget (the grid's size)."""

  def after_trial(self, study, trial, state, values) -> None:  # noqa: ARG002
    return None


def make_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
  if sweep.pruner == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                       n_warmup_steps=sweep.pruner_warmup_steps)
  if sweep.pruner == 'hyperband':  # resources are training steps, reported at evaluations
    return optuna.pruners.HyperbandPruner(min_resource=sweep.min_resource or 'auto',
                                          max_resource=sweep.max_resource or 'auto')
  return optuna.pruners.NopPruner()


def optimize(study: optuna.Study, objective: Callable[[optuna.Trial], float],
             sweep: SweepConfig, workdir: str) -> None:
  """Runs trials until the study holds its budget, then waits for the other workers'."""
  while True:
    trial = _claim(study, sweep.budget, workdir)
    if trial is not None:
      _run(study, trial, objective)
    elif any(t.state in _UNFINISHED for t in study.get_trials(deepcopy=False)):
      time.sleep(sweep.heartbeat_s)
    else:
      return


def _claim(study: optuna.Study, budget: int, workdir: str) -> optuna.Trial | None:
  """A trial for this worker: one queued for a retry, else a new one within the budget."""
  with workers_lock(workdir), _quiet():
    optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed and queued again
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.WAITING for t in trials) and counted(trials) >= budget:
      return None
    return study.ask()


def counted(trials: list[FrozenTrial]) -> int:
  """Trials that use the budget: all but the failed ones queued again as a retry."""
  retried = {n for t in trials for n in t.system_attrs.get('retry_history', ())}
  return sum(not (t.state == TrialState.FAIL and t.number in retried) for t in trials)


def _run(study: optuna.Study, trial: optuna.Trial,
         objective: Callable[[optuna.Trial], float]) -> None:
  """Runs one trial with its heartbeat and records how it ended. A trial stopped by an
  error or Ctrl-C is queued again (its workdir keeps its checkpoints) and the error raised."""
  from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize runs
  try:
    with get_heartbeat_thread(trial._trial_id, study._storage):
      value = objective(trial)
  except optuna.TrialPruned as e:
    _tell(study, trial, None, TrialState.PRUNED, str(e))
  except BaseException as e:
    frozen = _tell(study, trial, None, TrialState.FAIL, cli.one_line(e) or type(e).__name__)
    with _quiet():
      study._storage.get_heartbeat_stale_trial_callback()(study, frozen)
    raise
  else:
    # NaN (a run that diverged) is Optuna's FAIL: a result of these values, not retried.
    _tell(study, trial, value, None, trial.user_attrs.get('error', ''))


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None,
          state: TrialState | None, note: str) -> FrozenTrial:
  with _quiet():  # skip_if_finished: another worker took this one's trial for dead
    frozen = study.tell(trial, value, state=state, skip_if_finished=True)
  shown = '' if frozen.value is None else f' {frozen.value:.4f}'
  params = ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                     for k, v in frozen.params.items())
  report.say(f'Trial {frozen.number} {frozen.state.name}{shown} ({params})'
             + (f': {note}' if note else '') + f'; {frozen.user_attrs.get("workdir", "")}')
  return frozen


@contextlib.contextmanager
def workers_lock(workdir: str) -> Iterator[None]:
  """The workers' lock on claiming trials, on creating the database and the study, and on
  writing the report (two workers that finish together would write the same files)."""
  with open(os.path.join(workdir, CLAIM_LOCK), 'a', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Hides Optuna's warnings that its heartbeat, retry and constant-liar features are
  experimental, and that ask() is meant for study.optimize: this loop is that loop."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings('ignore', message='Heartbeat of storage')
    yield
