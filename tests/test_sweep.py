"""Sweeps end to end on tiny pretrain runs (a few seconds each), in process.

Properties: a study runs exactly its budget of trials, each an ordinary run in
trials/<number>/ whose config.json holds the trial's overrides, and the best trial's one-line
command, run alone with main.py, reproduces its metric bit for bit (the same compiled steps on
the same CPU devices); a pruned trial stops at its evaluation cleanly, with its checkpoint and
no finished record, and its command resumes it; a grid over named variants runs each variant
once with one run per seed; bad input is one line naming the field.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO, load_config
from llmopt_jax import stages, workdir as workdir_lib
from llmopt_jax.sweeps import config as sweep_config
from llmopt_jax.sweeps import study as study_lib

TIMEOUT_S = 300


def tiny_sweep(tfds_dir: str, **fields) -> ml_collections.ConfigDict:
  """configs/sweep.py:base=pretrain,tiny (4 trials of the learning rate), no pruning, with
  `fields` of config.sweep replaced."""
  config = load_config('sweep', 'base=pretrain,tiny')
  config.base.data.tfds_data_dir = tfds_dir
  config.sweep.pruner = 'none'
  config.sweep.update(fields)
  return config


def read_json(path) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def trials_of(workdir) -> list[optuna.trial.FrozenTrial]:
  study = optuna.load_study(study_name='sweep', storage=f'sqlite:///{workdir}/study.db')
  return study.get_trials()


def run_command(command: str, **replace: str) -> subprocess.CompletedProcess:
  """Runs a trial's `python main.py ...` command, some `--flag=value`s replaced."""
  args = shlex.split(command)
  assert args[:2] == ['python', 'main.py'], command
  args = [next((f'--{k}={v}' for k, v in replace.items() if a.startswith(f'--{k}=')), a)
          for a in args[2:]]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('LLMOPT_TRACEBACK', None)
  return subprocess.run([sys.executable, 'main.py', *args], check=False, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def test_tiny_study_runs_its_trials_and_the_best_command_reproduces(tfds_dir, tmp_path):
  """4 TPE trials of the learning rate: each an ordinary run in trials/<n>/ holding its
  value, its metric read from its summary, the report listing all four; the best trial's
  command, run alone in a fresh workdir, ends with the same metric."""
  workdir = tmp_path / 'sweep'
  record = stages.run(tiny_sweep(tfds_dir), str(workdir))

  trials = trials_of(workdir)
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
  for t in trials:
    run = workdir / t.user_attrs['workdir']
    assert run == workdir / 'trials' / str(t.number)
    assert t.user_attrs['overrides'] == t.params == {'optim.lr': t.params['optim.lr']}
    assert read_json(run / 'config.json')['optim']['lr'] == t.params['optim.lr']
    summary = read_json(run / 'summary.json')
    assert t.value == t.user_attrs['values'][0] == summary['final_eval']['eval/loss']
  assert len({t.params['optim.lr'] for t in trials}) == 4
  assert sorted(r['number'] for r in record['trials']) == [0, 1, 2, 3]
  assert (workdir / 'report.md').exists()

  best = min(trials, key=lambda t: t.value)
  assert record['best']['number'] == best.number
  fresh = tmp_path / 'again'
  result = run_command(best.user_attrs['command'], workdir=str(fresh))
  assert result.returncode == 0, result.stderr
  # The same config, compiled steps and batches on the same 8 CPU devices: bit for bit.
  assert read_json(fresh / 'summary.json')['final_eval']['eval/loss'] == best.value


def test_pruner_stops_a_worse_trial_cleanly_and_its_command_resumes_it(tfds_dir, tmp_path):
  """Median pruning after one finished trial: a trial with a 7x smaller learning rate is
  clearly worse at its first evaluation (step 3 of 6) and is stopped there."""
  config = tiny_sweep(tfds_dir, trials=2, sampler='random', pruner='median',
                      pruner_startup_trials=1)
  workdir = tmp_path / 'sweep'
  os.makedirs(workdir)
  study = study_lib.open_study(sweep_config.SweepConfig.from_config(config), str(workdir))
  for lr in (8e-3, 1.1e-3):  # inside the tiny space, [lr/3, 3 lr] around 3e-3
    study.enqueue_trial({'optim.lr': lr})
  stages.run(config, str(workdir))

  good, pruned = trials_of(workdir)
  assert good.state == TrialState.COMPLETE and pruned.state == TrialState.PRUNED
  assert list(pruned.intermediate_values) == [3]
  assert pruned.intermediate_values[3] > good.intermediate_values[3]
  run = workdir / 'trials' / '1'
  for finished in ('summary.json', 'model.json'):
    assert not (run / finished).exists(), finished
  assert sorted(os.listdir(run / 'checkpoints')) == ['3']  # saved, and no Orbax temporary

  result = run_command(pruned.user_attrs['command'])
  assert result.returncode == 0, result.stderr
  assert re.search(r'Resumed from \S*/checkpoints/3\.?$', result.stderr, re.MULTILINE), (
      result.stderr)
  assert read_json(run / 'summary.json')['final_step'] == 6


@pytest.mark.parametrize('warmup, rung', [(0, 1), (1, 1), (3, 1), (4, 2), (6, 2), (7, 3)])
def test_hyperbands_first_rung_is_the_first_evaluation_after_the_pruner_warmup(warmup, rung,
                                                                              tfds_dir):
  """With evaluations every 3 steps, sweep.pruner_warmup_steps=w puts Hyperband's smallest
  resource at the first evaluation at or after step w (the median pruner's rule too)."""
  config = tiny_sweep(tfds_dir, pruner='hyperband', pruner_warmup_steps=warmup)
  assert config.base.train.eval_every == 3
  sweep = sweep_config.SweepConfig.from_config(config)
  assert sweep.min_resource == 3 * rung
  assert study_lib.make_pruner(sweep)._min_resource == 3 * rung


def test_tune_finetune_starts_from_the_default_it_is_compared_with(tiny_bert_dir, tmp_path):
  """configs/tune_finetune.py: its space holds the default fine-tune's own values and reads at
  most 1.5x the default's queries per trial; its trial 0 is that default (enqueue_base), run
  as an ordinary fine-tune whose config.json holds the base's values."""
  default = load_config('finetune')
  full = sweep_config.SweepConfig.from_config(load_config('tune_finetune'))
  dims = {d.path: d for d in full.space.dimensions}
  for d in dims.values():
    assert (d.base in d.choices if d.kind == 'categorical' else d.low <= d.base <= d.high), d
  most_queries = max(dims['train.num_steps'].choices) * max(dims['train.batch_size'].choices)
  assert most_queries <= 1.5 * default.train.num_steps * default.train.batch_size
  # Hyperband judges no trial inside the longest warmup the space holds.
  assert full.min_resource >= dims['optim.warmup_steps'].high

  config = load_config('tune_finetune', 'tiny')
  config.base.init.model = tiny_bert_dir
  config.sweep.trials = 1
  workdir = tmp_path / 'tune'
  stages.run(config, str(workdir))
  [trial] = trials_of(workdir)
  assert trial.state == TrialState.COMPLETE
  run = read_json(workdir / 'trials' / '0' / 'config.json')
  for path, value in trial.params.items():
    section, field = path.split('.')
    assert value == config.base[section][field] == run[section][field], path


def test_grid_over_variants_runs_each_once_with_a_run_per_seed(tfds_dir, tmp_path):
  """An ablation: a grid over two named variants x 2 seeds is two trials, one per variant,
  each with a run per seed (its seed and the variant's value in its config.json) and the
  mean as its value; the report's ablation table pairs the variant with the baseline."""
  config = tiny_sweep(tfds_dir, sampler='grid', trials=0, seeds=2, baseline='slow')
  config.sweep.space.optim.lr = ()  # not searched: the variants set it
  config.sweep.variants = ml_collections.ConfigDict({
      'slow': {'optim': {'lr': 1e-3}}, 'fast': {'optim': {'lr': 9e-3}}})
  workdir = tmp_path / 'sweep'
  record = stages.run(config, str(workdir))

  trials = trials_of(workdir)
  assert sorted(t.params['variant'] for t in trials) == ['fast', 'slow']
  for t in trials:
    assert t.state == TrialState.COMPLETE
    lr = {'slow': 1e-3, 'fast': 9e-3}[t.user_attrs['variant']]
    assert t.user_attrs['seeds'] == [0, 1]
    values = t.user_attrs['values']
    for seed, value in zip([0, 1], values, strict=True):
      run = workdir / 'trials' / str(t.number) / f'seed{seed}'
      config_json = read_json(run / 'config.json')
      assert (config_json['seed'], config_json['optim']['lr']) == (seed, lr)
      assert read_json(run / 'summary.json')['final_eval']['eval/loss'] == value
    assert values[0] != values[1]  # the seeds are different runs
    assert t.value == pytest.approx(sum(values) / 2, rel=1e-15)
  ablation = {row['variant']: row for row in record['ablation']}
  assert ablation['slow']['n'] == ablation['fast']['n'] == 2
  assert ablation['fast']['vs_baseline']['n'] == 2


BAD = {
    # id: (config.sweep fields to set, what the one-line error must name)
    'unknown_space_path': ({'space': {'optim': {'lrr': ('float', 1e-4, 1e-2)}}},
                           'config.sweep.space.optim.lrr'),
    'low_above_high': ({'space': {'optim': {'lr': ('float', 1e-2, 1e-4, 'log')}}},
                       'config.sweep.space.optim.lr'),
    'wrong_type': ({'space': {'train': {'num_steps': ('float', 2.0, 8.0)}}},
                   'config.sweep.space.train.num_steps'),
    'grid_of_a_float_range': ({'sampler': 'grid', 'trials': 0}, 'config.sweep.space.optim.lr'),
    'unknown_sampler': ({'sampler': 'annealing'}, 'config.sweep.sampler'),
    'unknown_pruner': ({'pruner': 'sometimes'}, 'config.sweep.pruner'),
    'unknown_baseline': ({'baseline': 'nope'}, 'config.sweep.baseline'),
}


@pytest.mark.parametrize('case', list(BAD), ids=list(BAD))
def test_bad_sweep_field_is_one_line_naming_it(case, tmp_path):
  """Each mistake is found before the workdir is touched, in one line naming the field."""
  fields, name = BAD[case]
  config = tiny_sweep('')
  for key, value in fields.items():
    if key == 'space':
      config.sweep.space = ml_collections.ConfigDict(value)
    else:
      config.sweep[key] = value
  with pytest.raises(ValueError) as error:
    stages.run(config, str(tmp_path / 'sweep'))
  assert name in str(error.value) and '\n' not in str(error.value), str(error.value)
  assert not (tmp_path / 'sweep').exists()  # refused before the workdir is touched


def test_unreachable_database_is_one_line_naming_the_storage(tmp_path):
  """A PostgreSQL URL nobody listens at (port 1 of the loopback) fails at once, naming
  config.sweep.storage and the address."""
  config = tiny_sweep('', storage='postgresql://nobody@127.0.0.1:1/x')
  with pytest.raises(ValueError) as error:
    stages.run(config, str(tmp_path / 'sweep'))
  message = str(error.value)
  assert 'config.sweep.storage' in message and '127.0.0.1:1' in message, message
  assert '\n' not in message, message


def test_sweep_workdir_is_shared_by_workers_and_closed_to_a_single_run(tmp_path):
  """A sweep's workdir takes a shared lock: another worker (here a process holding the same
  shared lock) does not block it, and a single run's exclusive lock is refused, naming the
  sweep's workers."""
  workdir = tmp_path / 'sweep'
  workdir.mkdir()
  hold = ('import fcntl, sys, time; f = open(sys.argv[1], "a"); '
          'fcntl.flock(f, fcntl.LOCK_SH); print("held", flush=True); time.sleep(60)')
  holder = subprocess.Popen([sys.executable, '-c', hold, str(workdir / workdir_lib.LOCK)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    config = ml_collections.ConfigDict({'stage': 'sweep', 'seed': 0})
    workdir_lib.prepare(str(workdir), config, shared=True)
    workdir_lib.release(str(workdir))
    with pytest.raises(workdir_lib.WorkdirInUse, match='the workers of a sweep'):
      workdir_lib.prepare(str(workdir), config)
  finally:
    holder.kill()
    holder.wait()


def test_budget_counts_a_retried_trial_once():
  """A trial failed because its worker died and queued again counts once (its retry), a
  trial failed for good counts, so N workers finish exactly the budget."""
  def make(state, **attrs):
    return optuna.trial.create_trial(
        state=state, params={'x': 0.5}, value=1.0 if state == TrialState.COMPLETE else None,
        distributions={'x': optuna.distributions.FloatDistribution(0, 1)}, **attrs)

  study = optuna.create_study()
  study.add_trial(make(TrialState.FAIL))                                      # 0: worker died
  study.add_trial(make(TrialState.COMPLETE))                                  # 1
  study.add_trial(make(TrialState.WAITING, system_attrs={'failed_trial': 0,
                                                          'retry_history': [0]}))  # 2: retry
  study.add_trial(make(TrialState.FAIL))                                      # 3: diverged
  assert study_lib.counted(study.get_trials()) == 3
