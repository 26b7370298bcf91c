"""What trial pruning saves: the same random search over a Banking77 fine-tune, run without a
pruner and with the median and Hyperband pruners, over study seeds.

  python experiments/pruner_study.py                     # ~1 h 15 min on 2 idle CPU cores
  python experiments/pruner_study.py --seeds=0,1,2 --pruners=none,median,hyperband \
      --out=experiments/results/pruner_banking77.md

Each study is `configs/sweep.py` over `configs/finetune.py` (MiniLM) at 10 labelled queries
per class: `--trials` trials of `--steps` steps at batch 32, each evaluated every
`--steps / 5` steps on 256 validation queries (the values the pruner reads), the complete
ones scored once on 256 test queries. The search space is wide on purpose, as a first search
is: learning rate 1e-5..3e-3 (log), weight decay 0..0.1, warmup 0..steps/4 (20 steps).

The sampler is random search with the study seed, so every pruner of one seed draws the
same parameters for the same trial numbers (a pruned trial still uses a trial of the budget):
the studies differ only in which trials stop early. That makes the comparison paired: per
seed, the trial-seconds a pruner saves against `none`, and the best validation accuracy it
reaches against `none`'s (equal unless the pruner stopped the trial that would have won).
`median` prunes a trial whose value at an evaluation is below the median of the earlier
trials' at the same step, once `--median_startup` trials finished; `hyperband` (Optuna's,
reduction factor 3) runs brackets of successive halving from one evaluation's steps up.

A finished study is read, not run again, so a stopped run resumes with its next study.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402  (after the path fix above)

from llmopt_jax import compare  # noqa: E402
from llmopt_jax.sweeps import stats  # noqa: E402

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Study seeds.')
_PRUNERS = flags.DEFINE_list('pruners', ['none', 'median', 'hyperband'], 'The first is the '
                             'reference the others are compared with.')
_TRIALS = flags.DEFINE_integer('trials', 10, 'Trials per study (pruned ones included).')
_STEPS = flags.DEFINE_integer('steps', 80, "Each trial's training steps.")
_MEDIAN_STARTUP = flags.DEFINE_integer('median_startup', 3, 'median: trials that finish '
                                       'before any is pruned.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/pruner_study', 'Where the studies run.')
_OUT = flags.DEFINE_string('out', '', 'Also write the report (markdown) here, a PNG beside it.')



def space(steps: int) -> dict[str, tuple]:
  return {'optim.lr': ('float', 1e-5, 3e-3, 'log'),
          'optim.weight_decay': ('float', 0.0, 0.1),
          'optim.warmup_steps': ('int', 0, steps // 4)}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_command(pruner: str, seed: int, workdir: str) -> list[str]:
  """The main.py command of one study."""
  steps, every = _STEPS.value, max(1, _STEPS.value // 5)
  base = {'seed': seed, 'data.shots_per_class': 10, 'train.num_steps': steps,
          'train.eval_every': every, 'checkpoint.every_steps': every,
          'train.eval_batches': 8, 'test_batches': 8}
  sweep = {'sampler': 'random', 'sampler_seed': seed, 'trials': _TRIALS.value,
           'pruner': pruner, 'pruner_startup_trials': _MEDIAN_STARTUP.value}
  return (['python', 'main.py', '--config=configs/sweep.py', f'--workdir={workdir}']
          + [f'--config.base.{k}={v}' for k, v in base.items()]
          + [f'--config.sweep.{k}={v}' for k, v in sweep.items()]
          + [f'--config.sweep.space.{k}={v!r}' for k, v in space(steps).items()])


def run_study(pruner: str, seed: int) -> list[dict]:
  """The study's trials (report.json's), by number; run first unless already finished."""
  workdir = os.path.join(_WORKDIR.value, f'{pruner}_seed{seed}')
  if len(_trials(workdir)) < _TRIALS.value or any(
      t['state'] not in ('COMPLETE', 'PRUNED') for t in _trials(workdir)):
    command = study_command(pruner, seed, workdir)
    print('+', ' '.join(command), flush=True)
    with open(f'{workdir}.log', 'a', encoding='utf-8') as log:
      subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True, stdout=log,
                     stderr=subprocess.STDOUT)
  return _trials(workdir)


def _trials(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'report.json')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return sorted(json.load(f)['trials'], key=lambda t: t['number'])


def best(trials: list[dict]) -> dict:
  """The complete trial with the highest validation accuracy (the study's best)."""
  return max((t for t in trials if t['state'] == 'COMPLETE'), key=lambda t: t['value'])


def steps_trained(pruner: str, seed: int, trial: dict) -> int:
  """The last step the trial's run logged: all of them, or where the pruner stopped it."""
  path = os.path.join(_WORKDIR.value, f'{pruner}_seed{seed}', trial['workdir'], 'metrics.jsonl')
  with open(path, encoding='utf-8') as f:
    return max(json.loads(line)['step'] for line in f if line.strip())


def test_accuracy(pruner: str, seed: int, trial: dict) -> float:
  """The trial's accuracy on its 256 test queries (its run's report.json)."""
  path = os.path.join(_WORKDIR.value, f'{pruner}_seed{seed}', trial['workdir'], 'report.json')
  with open(path, encoding='utf-8') as f:
    return json.load(f)['accuracy']


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  seeds = [int(s) for s in _SEEDS.value]
  studies = {(p, s): run_study(p, s) for s in seeds for p in _PRUNERS.value}
  report = _report(studies, seeds)
  print(report)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(report)
    _plot(studies, seeds, os.path.splitext(_OUT.value)[0] + '.png')


def _fmt(s: stats.Summary, spec: str) -> str:
  return f'{s.mean:{spec}} ± {s.std:{spec}}'


def _report(studies: dict, seeds: list[int]) -> str:
  reference = _PRUNERS.value[0]
  seconds = {key: sum(t['seconds'] for t in trials) for key, trials in studies.items()}
  steps = {(p, s): sum(steps_trained(p, s, t) for t in trials)
           for (p, s), trials in studies.items()}
  best_val = {key: 100 * best(trials)['value'] for key, trials in studies.items()}
  rows = []
  for pruner in _PRUNERS.value:
    by_seed = lambda values, p=pruner: {s: values[p, s] for s in seeds}  # noqa: E731
    saved = {s: 100 * (1 - seconds[pruner, s] / seconds[reference, s]) for s in seeds}
    steps_saved = [100 * (1 - steps[pruner, s] / steps[reference, s]) for s in seeds]
    pruned = [sum(t['state'] == 'PRUNED' for t in studies[pruner, s]) for s in seeds]
    tests = [100 * test_accuracy(pruner, s, best(studies[pruner, s])) for s in seeds]
    rows.append([pruner, _fmt(stats.summary(list(by_seed(seconds).values())), '.0f'),
                 '' if pruner == reference else _fmt(stats.summary(list(saved.values())),
                                                     '.1f'),
                 '' if pruner == reference else _fmt(stats.summary(steps_saved), '.1f'),
                 f'{statistics.mean(pruned):.1f}',
                 _fmt(stats.summary(list(by_seed(best_val).values())), '.2f'),
                 '' if pruner == reference else _fmt(
                     stats.paired_difference(by_seed(best_val), by_seed(best_val, reference)),
                     '+.2f'),
                 _fmt(stats.summary(tests), '.2f')])
  table = compare.markdown_table(
      ['pruner', 'trial-seconds', f'% seconds saved vs {reference}',
       f'% training steps saved vs {reference}', 'trials pruned',
       'best validation acc. %', f'difference vs {reference}, points',
       "best trial's test acc. %"], rows)
  per_seed = compare.markdown_table(
      ['study', 'pruned trials', 'best trial', 'seconds'],
      [[f'{p} seed {s}', ', '.join(f"{t['number']}" for t in trials
                                   if t['state'] == 'PRUNED') or '-',
        f"{best(trials)['number']} ({100 * best(trials)['value']:.2f})",
        f'{seconds[p, s]:.0f}'] for (p, s), trials in sorted(studies.items())])
  return (f'## Banking77 10-shot fine-tune, {_TRIALS.value} random-search trials of '
          f'{_STEPS.value} steps, seeds {seeds}\n\n'
          f'Mean ± sample std over the study seeds; differences are paired per seed. '
          f'Trial-seconds are measured, summed over the study\'s trials, and move with the '
          f'machine\'s load; training steps (summed over the trials, each to its last '
          f'logged step) do not.\n\n{table}\n\n'
          f'{per_seed}\n\n'
          f'Command: `python {" ".join(sys.argv)}`; {datetime.date.today()}, '
          f'{platform.machine()} {os.cpu_count()} cores.\n')


def _plot(studies: dict, seeds: list[int], path: str) -> None:
  """Best validation accuracy so far against trial-seconds spent, every study."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  colors = dict(zip(_PRUNERS.value, ('tab:gray', 'tab:blue', 'tab:orange', 'tab:green')))
  for (pruner, seed), trials in sorted(studies.items()):
    spent, best_so_far, xs, ys = 0.0, 0.0, [], []
    for t in trials:
      spent += t['seconds']
      if t['state'] == 'COMPLETE':
        best_so_far = max(best_so_far, 100 * t['value'])
      xs.append(spent)
      ys.append(best_so_far)
    ax.step(xs, ys, where='post', color=colors[pruner], alpha=0.8,
            label=pruner if seed == seeds[0] else None)
  ax.set(xlabel='trial-seconds spent', ylabel='best validation accuracy so far (%)',
         title='Random search with and without pruning (one line per seed)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  app.run(main)
