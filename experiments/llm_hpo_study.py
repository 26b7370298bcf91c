"""LLM-proposed hyperparameters against TPE and random search, at equal budgets, over seeds.

  python experiments/llm_hpo_study.py --objective=synthetic            # seconds
  python experiments/llm_hpo_study.py --objective=banking77            # ~1 h on 2 CPU cores
  python experiments/llm_hpo_study.py --objective=banking77 --trials=10 --seeds=0,1,2 \
      --samplers=llm,llm_warm_start,tpe,random --out=experiments/results/llm_hpo_banking77.md

Samplers: `llm` (every trial from the advisor), `llm_warm_start` (its first
`warm_start_trials`, TPE after), `tpe` and `random`, the last two seeded with the default
configuration (trial 0 is the base config's values, `sweep.enqueue_base`). The advisor is
whatever OpenAI-compatible endpoint `--base_url`/`--model` name; with none given, the
**scripted expert** of experiments/scripted_expert.py, a heuristic and not a language model,
served on loopback and labelled as such in every table.

Objectives. `synthetic`: the Banking77 fine-tune's real search space (configs/sweep.py's
prompt, space and validation included) scored by a closed-form surrogate with a known
optimum of 0.93 (learning rate best at 4e-4 x sqrt(batch/32), six epochs, 5% warmup,
weight decay 0.05; the base config's values score about 0.875) plus N(0, 0.003) noise; its "seconds" are a cost model (one step of
32 queries = 0.8 s). `banking77`: real trials, each `configs/finetune.py:tiny` (MiniLM,
30 steps, validation accuracy on 256 queries) run by the sweep stage in its own process.
A study seed sets the sampler's seed and, for real trials, the base config's seed.
Printed: best metric after 5 and after all trials, and trial-seconds, as mean +- std over
the study seeds, with a PNG of the mean best-so-far curves beside the report.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402  (after the path fix above)
import optuna  # noqa: E402
from absl import app, flags  # noqa: E402

import scripted_expert  # noqa: E402
from llmopt_jax import compare  # noqa: E402
from llmopt_jax.sweeps import config as sweep_config  # noqa: E402
from llmopt_jax.sweeps import study as study_lib  # noqa: E402

_OBJECTIVE = flags.DEFINE_enum('objective', 'synthetic', ['synthetic', 'banking77'], '')
_TRIALS = flags.DEFINE_integer('trials', 10, 'Trials per study.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Study seeds.')
_SAMPLERS = flags.DEFINE_list('samplers', ['llm', 'llm_warm_start', 'tpe', 'random'], '')
_BASE_URL = flags.DEFINE_string('base_url', '', "An LLM endpoint; '' = the scripted expert.")
_MODEL = flags.DEFINE_string('model', '', 'The endpoint\'s model name.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/llm_hpo', 'Where the studies run.')
_OUT = flags.DEFINE_string('out', '', 'Also write the report (markdown) here.')

OPTIMUM = 0.93
WARM_START = 5
STARTUP = 3  # TPE's random trials before it models (Optuna's default 10 = the whole budget)
# The searched fields of the Banking77 fine-tune (configs/finetune.py): the seed's "learning
# rate ... batch size ... number of epochs", plus warmup and weight decay.
SYNTHETIC_SPACE = {'optim.lr': ('float', 1e-5, 1e-3, 'log'),
                   'optim.weight_decay': ('float', 0.0, 0.1),
                   'optim.warmup_steps': ('int', 0, 200),
                   'train.batch_size': ('categorical', (16, 32, 64, 128)),
                   'train.num_steps': ('int', 200, 2000, 50)}
REAL_SPACE = {'optim.lr': ('float', 1e-4, 1e-2, 'log'),
              'optim.weight_decay': ('float', 0.0, 0.1),
              'optim.warmup_steps': ('int', 0, 15),
              'train.batch_size': ('categorical', (16, 32, 64))}


def surrogate(p: dict, rng: random.Random) -> tuple[float, float, int]:
  """(validation accuracy, seconds, training examples) of the synthetic fine-tune `p`."""
  batch, steps = p['train.batch_size'], p['train.num_steps']
  lr_best = 4e-4 * math.sqrt(batch / 32)
  epochs = steps * batch / 9000
  penalty = (0.06 * math.log10(p['optim.lr'] / lr_best) ** 2
             + 0.02 * ((p['optim.weight_decay'] - 0.05) / 0.1) ** 2
             + 0.015 * ((p['optim.warmup_steps'] / steps - 0.05) / 0.1) ** 2
             + 0.03 * math.log2(epochs / 6) ** 2)
  return (max(0.0, OPTIMUM - penalty) + rng.gauss(0, 0.003), steps * batch / 32 * 0.8,
          steps * batch)


def sweep_fields(sampler: str, seed: int, base_url: str, model: str) -> dict[str, str]:
  """config.sweep overrides shared by both objectives (as command-line values)."""
  return {'sampler': sampler, 'sampler_seed': str(seed), 'trials': str(_TRIALS.value),
          'pruner': 'none', 'enqueue_base': str(sampler in ('tpe', 'random')),
          'startup_trials': str(STARTUP),
          'llm.base_url': base_url, 'llm.model': model,
          'llm.warm_start_trials': str(WARM_START)}


def synthetic_study(sampler: str, seed: int, base_url: str, model: str) -> list[tuple]:
  """[(value, seconds, examples)] of one synthetic study, in trial order (in process)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tests'))
  from conftest import load_config
  config = load_config('sweep')
  space = {}
  for path, spec in SYNTHETIC_SPACE.items():
    section, name = path.split('.')
    space.setdefault(section, {})[name] = spec
  config.sweep.space = ml_collections.ConfigDict(space)
  for key, value in sweep_fields(sampler, seed, base_url, model).items():
    _set(config.sweep, key, value)
  sweep = sweep_config.SweepConfig.from_config(config)
  study = optuna.create_study(direction='maximize', sampler=study_lib.make_sampler(sweep))
  if sweep.enqueue_base:
    study.enqueue_trial(sweep_config.base_params(sweep.space))
  rng, results = random.Random(seed), []

  def objective(trial: optuna.Trial) -> float:
    _, params = sweep.space.suggest(trial)
    result = surrogate(params, rng)
    results.append(result)
    return result[0]
  study.optimize(objective, n_trials=_TRIALS.value)
  return results


def banking77_study(sampler: str, seed: int, base_url: str, model: str) -> list[tuple]:
  """[(value, seconds, examples)] of one real study: the sweep stage in its own process (a
  finished study's command only rewrites its report, so rerunning this script is cheap)."""
  workdir = os.path.join(_WORKDIR.value, f'{sampler}_seed{seed}')
  args = [sys.executable, 'main.py', '--config=configs/sweep.py:base=finetune,base_arg=tiny',
          f'--config.base.seed={seed}', '--config.base.train.eval_batches=8',
          '--config.base.test_batches=8', f'--workdir={workdir}']
  args += [f'--config.sweep.{k}={v}' for k, v in sweep_fields(sampler, seed, base_url,
                                                             model).items()]
  args += [f'--config.sweep.space.{path}={spec!r}' for path, spec in REAL_SPACE.items()]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  trials = _finished_trials(workdir)
  if len(trials) < _TRIALS.value:  # a study finished by an earlier run is read, not rerun
    with open(f'{workdir}.log', 'w', encoding='utf-8') as log:
      subprocess.run(args, cwd=repo, check=True, stdout=log, stderr=subprocess.STDOUT)
    trials = _finished_trials(workdir)
  return [(t['value'], t['seconds'], _examples(os.path.join(workdir, t['workdir'])))
          for t in trials]


def _finished_trials(workdir: str) -> list[dict]:
  """The COMPLETE trials of the study in `workdir` by number ([] before its report)."""
  path = os.path.join(workdir, 'report.json')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    trials = json.load(f)['trials']
  return sorted((t for t in trials if t['state'] == 'COMPLETE'), key=lambda t: t['number'])


def _examples(run: str) -> int:
  """Training examples a run processed (batch size x steps), from its config.json."""
  with open(os.path.join(run, 'config.json'), encoding='utf-8') as f:
    train = json.load(f)['train']
  return train['batch_size'] * train['num_steps']


def _set(section, dotted: str, text: str) -> None:
  *parents, leaf = dotted.split('.')
  for name in parents:
    section = section[name]
  kind = type(section[leaf])
  section[leaf] = text == 'True' if kind is bool else kind(text)


def best_after(results: list[tuple], n: int) -> float:
  return max(r[0] for r in results[:n])


def summary(values: list[float], spec: str = '.4f') -> str:
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{statistics.mean(values):{spec}} ± {std:{spec}}'


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  server = None if _BASE_URL.value else scripted_expert.start()
  base_url = _BASE_URL.value or f'http://127.0.0.1:{server.server_port}/v1'
  model = _MODEL.value or scripted_expert.MODEL
  advisor = (f'{model} at {base_url}' if _BASE_URL.value else
             'the scripted expert (experiments/scripted_expert.py: a heuristic, NOT an LLM)')
  run = synthetic_study if _OBJECTIVE.value == 'synthetic' else banking77_study
  seeds = [int(s) for s in _SEEDS.value]
  studies = {}
  for sampler in _SAMPLERS.value:
    for seed in seeds:
      studies[sampler, seed] = run(sampler, seed, base_url, model)
      print(f'{sampler} seed {seed}: ' + ', '.join(f'{r[0]:.4f}' for r in
                                                  studies[sampler, seed]), flush=True)
  report = _report(studies, seeds, advisor)
  print(report)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(report)
    _plot(studies, seeds, os.path.splitext(_OUT.value)[0] + '.png')


_COST = {'synthetic': 'Trial-seconds are the cost model\'s (one step of 32 = 0.8 s).',
         'banking77': 'Trial-seconds are measured and depend on the machine\'s load; training '
                      'examples (batch size x steps, summed over the trials) do not.'}


def _report(studies: dict, seeds: list[int], advisor: str) -> str:
  n = _TRIALS.value
  rows = []
  for sampler in _SAMPLERS.value:
    runs = [studies[sampler, s] for s in seeds]
    rows.append([sampler, summary([best_after(r, 5) for r in runs]),
                 summary([best_after(r, n) for r in runs]),
                 summary([sum(t[1] for t in r) for r in runs], '.0f'),
                 summary([sum(t[2] for t in r) / 1000 for r in runs], '.1f')])
  table = compare.markdown_table(
      ['sampler', 'best after 5 trials', f'best after {n} trials', 'trial-seconds',
       'training examples (thousands)'], rows)
  optimum = f'; known optimum {OPTIMUM} (+ noise)' if _OBJECTIVE.value == 'synthetic' else ''
  return (f'## {_OBJECTIVE.value}: {n} trials a study, seeds {seeds}{optimum}\n\n'
          f'Advisor of llm / llm_warm_start: {advisor}. Metric: validation accuracy '
          f'(mean ± sample std over the {len(seeds)} study seeds). {_COST[_OBJECTIVE.value]}'
          f'\n\n{table}\n\n'
          f'Command: `python {" ".join(sys.argv)}`; {datetime.date.today()}, '
          f'{platform.machine()} {os.cpu_count()} cores.\n')


def _plot(studies: dict, seeds: list[int], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for sampler in _SAMPLERS.value:
    curves = [[best_after(studies[sampler, s], k) for k in range(1, _TRIALS.value + 1)]
              for s in seeds]
    ax.plot(range(1, _TRIALS.value + 1), [statistics.mean(c) for c in zip(*curves)],
            marker='o', label=sampler)
  ax.set(xlabel='trials', ylabel='best validation accuracy (mean over seeds)',
         title=f'{_OBJECTIVE.value}: best so far')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  app.run(main)
