"""A sweep's workers as separate `main.py` processes: sharing one study, and dying mid-trial.

Properties: two workers started on one workdir, against the default SQLite file or a real
PostgreSQL server, together run a grid exactly once (every point one COMPLETE trial, no
trial number run by both, every trial's run finished, the report listing them all); a worker
killed with SIGKILL mid-trial and started again leaves the trials that had finished untouched
and resumes the interrupted one in its own workdir from its last checkpoint (the steps before
it are not trained again), and the study ends with its budget of COMPLETE trials.

The base is configs/pretrain.py:tiny (seconds a trial, most of it compiling, which the
session's persistent compilation cache shares between the processes) with a one-second
heartbeat, so a dead worker's trial is retried three seconds after its last beat.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO
from openai_stub import OpenAIStub

TIMEOUT_S = 240
GRID = (1e-3, 3e-3, 9e-3)  # learning rates: a grid of three points (each one trial)
KILL_STEPS = 30  # steps of a trial in the kill test: a window of ~1 s to land the kill in
POSTGRES_BIN = '/usr/local/bin'


def sweep_args(workdir, lrs=GRID, storage: str = '', steps: int = 6) -> list[str]:
  """The workers' command line: a grid over `lrs` of tiny pretrain runs of `steps` steps."""
  return ['main.py', '--config=configs/sweep.py:base=pretrain,tiny',
          '--config.sweep.sampler=grid', '--config.sweep.trials=0',
          '--config.sweep.pruner=none', '--config.sweep.heartbeat_s=1',
          f'--config.sweep.space.optim.lr={("categorical", tuple(lrs))!r}',
          f'--config.sweep.storage={storage}', f'--config.base.train.num_steps={steps}',
          # a schedule without num_steps in it: every test's trials compile the same steps
          '--config.base.optim.schedule=constant', '--config.base.optim.warmup_steps=0',
          f'--workdir={workdir}']


def start_worker(args: list[str], tfds_dir: str, log_path) -> subprocess.Popen:
  """A worker process whose output goes to `log_path` (a file, so no pipe fills up)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TFDS_DATA_DIR': tfds_dir,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}  # small steps too: 2 s a worker
  env.pop('LLMOPT_TRACEBACK', None)
  with open(log_path, 'w', encoding='utf-8') as log:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def finish(workers: list[subprocess.Popen], logs: list) -> list[str]:
  """Waits for every worker (killing any left when one times out); returns their outputs."""
  try:
    for worker in workers:
      worker.wait(timeout=TIMEOUT_S)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  outputs = [read_log(log) for log in logs]
  for worker, output in zip(workers, outputs, strict=True):
    assert worker.returncode == 0, output[-3000:]
  return outputs


@pytest.fixture(scope='module')
def warm_tfds_dir(tfds_dir, tmp_path_factory) -> str:
  """The TFDS dir with the shipped corpus prepared (so concurrent workers do not race to
  build it), once the grid's trials are in the session's compilation cache.

  Compiling cold, two workers compile the same steps at once, and with pytest-xdist two
  tests' four workers do: on two cores that doubled this module's time. So one worker first
  runs the grid alone, once per session (a lock and a marker in the cache directory, which
  the xdist workers share), and every later worker loads what it compiled.
  """
  from llmopt_jax.data import sources
  sources.load_text_source('tiny_shakespeare', 'train', data_dir=tfds_dir)
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if not cache:
    return tfds_dir
  with open(os.path.join(cache, 'sweep_workers.lock'), 'a', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    warm = os.path.join(cache, 'sweep_workers.warm')
    if not os.path.exists(warm):
      workdir = tmp_path_factory.mktemp('warm')
      finish([start_worker(sweep_args(workdir / 'sweep'), tfds_dir, workdir / 'warm.log')],
             [workdir / 'warm.log'])
      open(warm, 'w').close()  # noqa: SIM115
  return tfds_dir


def read_log(path) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def read_json(path) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def load_trials(storage: str, workdir) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial]]:
  url = storage.replace('postgresql://', 'postgresql+psycopg2://')  # SQLAlchemy 2.1: psycopg 3
  study = optuna.load_study(study_name='sweep', storage=url or f'sqlite:///{workdir}/study.db')
  return study, study.get_trials()


def completed_lines(output: str) -> list[int]:
  """The trial numbers a worker's output says it completed ('Trial 3 COMPLETE 5.0231 ...')."""
  return [int(n) for n in re.findall(r'^Trial (\d+) COMPLETE', output, re.MULTILINE)]


def check_grid_ran_once(workdir, storage: str, outputs: list[str]) -> None:
  """Every grid point one COMPLETE trial, each run by one worker, its run finished with that
  point's learning rate and its metric; the report lists them all; both workers joined."""
  study, trials = load_trials(storage, workdir)
  assert [t.state for t in trials] == [TrialState.COMPLETE] * len(GRID)
  assert sorted(t.number for t in trials) == list(range(len(GRID)))
  assert sorted(t.params['optim.lr'] for t in trials) == sorted(GRID)
  assert study.user_attrs['workers'] == 2
  run_by = sorted(n for output in outputs for n in completed_lines(output))
  assert run_by == list(range(len(GRID))), run_by  # no trial was run by both workers
  for t in trials:
    run = workdir / 'trials' / str(t.number)
    assert t.user_attrs['workdir'] == f'trials/{t.number}'
    assert read_json(run / 'config.json')['optim']['lr'] == t.params['optim.lr']
    summary = read_json(run / 'summary.json')
    assert summary['final_step'] == 6
    assert summary['final_eval']['eval/loss'] == t.value
  report = read_json(workdir / 'report.json')
  assert sorted((r['number'], r['state']) for r in report['trials']) == [
      (n, 'COMPLETE') for n in range(len(GRID))]


def run_two_workers(workdir, tfds_dir: str, storage: str = '') -> list[str]:
  workdir.mkdir()
  logs = [workdir.parent / f'worker{k}.log' for k in range(2)]
  workers = [start_worker(sweep_args(workdir, storage=storage), tfds_dir, log) for log in logs]
  return finish(workers, logs)


def test_two_workers_on_sqlite_run_the_grid_once(warm_tfds_dir, tmp_path):
  workdir = tmp_path / 'sweep'
  outputs = run_two_workers(workdir, warm_tfds_dir)
  check_grid_ran_once(workdir, '', outputs)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def postgres_url() -> Iterator[str]:
  """A throwaway PostgreSQL server on the loopback: `postgresql://postgres@127.0.0.1:PORT/
  optuna`, stopped (and its directory removed) after the module's tests, pass or fail.

  initdb and the server refuse to run as root. As root (this machine's test runs), both run
  as the image's `postgres` system user (else `nobody`) through `runuser -u USER --`, in a
  directory under /tmp chowned to that user (pytest's tmp_path is root's, mode 0700, which
  that user cannot enter). As anyone else they run directly. The socket also goes in that
  directory; trust authentication, as the server listens on 127.0.0.1 only.
  """
  initdb, pg_ctl = (os.path.join(POSTGRES_BIN, name) for name in ('initdb', 'pg_ctl'))
  if not (os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK)):
    initdb, pg_ctl = shutil.which('initdb'), shutil.which('pg_ctl')
  if not (initdb and pg_ctl):
    pytest.skip('PostgreSQL binaries (initdb, pg_ctl) are not installed')
  as_user, owner = _postgres_user()
  root = tempfile.mkdtemp(prefix='llmopt_pg_')
  if owner is not None:
    shutil.chown(root, owner)
  data, port = os.path.join(root, 'data'), _free_port()

  def postgres(*args: str, must: bool = True) -> None:
    done = subprocess.run([*as_user, *args], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 or not must, f'{args[0]}: {done.stdout}{done.stderr}'

  try:
    postgres(initdb, '-D', data, '--auth=trust', '-U', 'postgres', '--no-sync', '-E', 'UTF8')
    # -l: the server's output to a file, not to this pipe (which it would keep open)
    postgres(pg_ctl, '-D', data, '-l', os.path.join(root, 'server.log'), '-w', '-o',
             f'-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off', 'start')
    try:
      import psycopg2
      connection = psycopg2.connect(f'postgresql://postgres@127.0.0.1:{port}/postgres')
      connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
      connection.cursor().execute('CREATE DATABASE optuna')
      connection.close()
      yield f'postgresql://postgres@127.0.0.1:{port}/optuna'
    finally:
      postgres(pg_ctl, '-D', data, '-w', '-m', 'fast', 'stop', must=False)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _postgres_user() -> tuple[list[str], str | None]:
  """(the command prefix that runs PostgreSQL's programs, the user who owns its files)."""
  if os.geteuid() != 0:
    return [], None
  import pwd
  runuser, known = shutil.which('runuser'), {user.pw_name for user in pwd.getpwall()}
  users = [user for user in ('postgres', 'nobody') if user in known]
  if not (runuser and users):
    pytest.skip('running as root, and no runuser or unprivileged user to run PostgreSQL as')
  return [runuser, '-u', users[0], '--'], users[0]


def test_two_workers_on_postgresql_run_the_grid_once(warm_tfds_dir, postgres_url, tmp_path):
  workdir = tmp_path / 'sweep'
  outputs = run_two_workers(workdir, warm_tfds_dir, storage=postgres_url)
  assert not (workdir / 'study.db').exists()  # the study is in the server
  check_grid_ran_once(workdir, postgres_url, outputs)


def saved_steps(run) -> list[int]:
  """The steps of `run`'s complete checkpoints (Orbax renames a save to its step when done)."""
  directory = run / 'checkpoints'
  names = os.listdir(directory) if directory.is_dir() else []
  return sorted(int(name) for name in names if name.isdigit())


def wait_until(condition, worker: subprocess.Popen, log) -> None:
  """Polls the filesystem every 20 ms until `condition()`; fails if the worker exits first."""
  deadline = time.monotonic() + TIMEOUT_S
  while not condition():
    assert worker.poll() is None, read_log(log)[-3000:]
    assert time.monotonic() < deadline, 'timed out waiting for the worker'
    time.sleep(0.02)


@pytest.mark.parametrize('sampler', ['grid', 'llm_warm_start'])
def test_killed_worker_restarted_resumes_its_trial_and_keeps_finished_ones(warm_tfds_dir,
                                                                           tmp_path, sampler):
  """Two trials: the worker is killed (SIGKILL) once trial 0 has finished and trial 1 has
  saved a checkpoint; the same command started again waits out trial 1's heartbeat, retries
  it as trial 2 in trials/1, resumed from that checkpoint, and leaves trial 0 alone. Under
  llm_warm_start (trial 0 proposed by an LLM, a real HTTP server on loopback; trial 1 by
  TPE) the retry keeps its values and proposer, and the LLM is not asked again."""
  workdir, lrs = tmp_path / 'sweep', GRID[:2]
  workdir.mkdir()
  args = sweep_args(workdir, lrs, steps=KILL_STEPS)
  stub = OpenAIStub()
  if sampler == 'llm_warm_start':
    stub.script(json.dumps({'params': {'optim.lr': lrs[1]}, 'reason': 'the larger rate'}))
    args = [a for a in args if not a.startswith(('--config.sweep.sampler=',
                                                 '--config.sweep.trials='))]
    args[2:2] = ['--config.sweep.sampler=llm_warm_start', '--config.sweep.trials=2',
                 '--config.sweep.llm.warm_start_trials=1', '--config.sweep.startup_trials=1',
                 f'--config.sweep.llm.base_url={stub.base_url}',
                 f'--config.sweep.llm.model={stub.model}']
  first, second = (tmp_path / f'worker{k}.log' for k in range(2))
  done, run = workdir / 'trials' / '0' / 'summary.json', workdir / 'trials' / '1'
  worker = start_worker(args, warm_tfds_dir, first)
  try:
    wait_until(lambda: done.exists() and saved_steps(run), worker, first)
  finally:
    worker.send_signal(signal.SIGKILL)
    worker.wait()
  assert not (run / 'summary.json').exists(), 'trial 1 finished before the kill'
  saved = saved_steps(run)[-1]
  assert saved < KILL_STEPS
  before = (done.read_bytes(), done.stat().st_mtime_ns)

  try:
    output, = finish([start_worker(args, warm_tfds_dir, second)], [second])
  finally:
    stub.stop()
  _, trials = load_trials('', workdir)
  assert [(t.number, t.state) for t in trials] == [
      (0, TrialState.COMPLETE), (1, TrialState.FAIL), (2, TrialState.COMPLETE)]
  killed, retry = trials[1], trials[2]
  assert retry.system_attrs['failed_trial'] == 1
  assert retry.params == killed.params and retry.user_attrs['workdir'] == 'trials/1'
  if sampler == 'grid':
    assert sorted(trials[n].params['optim.lr'] for n in (0, 2)) == sorted(lrs)
  # Resumed from the checkpoint it had: the steps before it were not trained again.
  assert re.search(rf'^Resumed from {re.escape(str(run))}/checkpoints/{saved}\.$', output,
                   re.MULTILINE), output[-3000:]
  logged = [int(s) for s in re.findall(rf'^step (\d+)/{KILL_STEPS}:', output, re.MULTILINE)]
  assert logged and min(logged) > saved, logged
  summary = read_json(run / 'summary.json')
  assert summary['final_step'] == KILL_STEPS
  assert summary['final_eval']['eval/loss'] == retry.value
  # The finished trial is neither lost nor run again.
  assert completed_lines(output) == [2]
  assert (done.read_bytes(), done.stat().st_mtime_ns) == before
  assert trials[0].value == read_json(done)['final_eval']['eval/loss']
  report = read_json(workdir / 'report.json')
  assert [(r['number'], r['state']) for r in report['trials']] == [
      (0, 'COMPLETE'), (1, 'FAIL'), (2, 'COMPLETE')]
  if sampler == 'llm_warm_start':
    assert [t.user_attrs['proposer'] for t in trials] == ['llm', 'tpe', 'tpe']
    assert trials[0].params == {'optim.lr': lrs[1]}
    assert len(stub.requests) == 1 and stub.left == 0  # the restart asked nothing
