"""Banking77 with 10 labelled examples per class: augmentation, consistency training,
distillation on a transfer set and multi-task learning, and the main job itself, each over
seeds, as mean +- std and paired differences.

  python experiments/few_shot_study.py --study=augment     # ~1 h on 2 CPU cores
  python experiments/few_shot_study.py --study=distill     # after augment: its teachers
  python experiments/few_shot_study.py --study=multitask --steps=400    # ~20 min a seed
  python experiments/few_shot_study.py --study=main_job --teacher=runs/distill/teacher
  python experiments/few_shot_study.py --study=augment --seeds=0,1,2 --steps=250 \
      --out=experiments/results/few_shot_banking77.md

Every run is an ordinary `main.py` command (printed, and listed in the report), so any cell
of a table can be rerun alone. A seed sets the run's seed, and with it which 10 examples of
each class are the labelled ones (data.shots_seed = -1 follows config.seed), the order, the
augmentation draws and dropout: variants of one seed share their labelled examples, so their
per-seed differences are paired.

Studies (configs/finetune.py and configs/distill.py at --steps steps, validation every half,
the best validation step scored once on the whole Banking77 test split). The fine-tunes peak
at --lr = 3e-4, not the full-data default of 1e-4: 250 steps at 1e-4 left the 10-shot
fine-tune underfit (training loss 1.39, its predictions so unsure that no unlabelled row
ever passed consistency training's confidence threshold), and a study of regularisers on an
underfit baseline measures how fast each variant converges instead. Consistency training
keeps rows whose clean prediction reaches 0.5 (UDA's 0.8 is for a handful of classes; with
77, few predictions reach it within such a budget). The students keep configs/distill.py's 5e-4.

  augment: MiniLM fine-tuned on the 10-shot split, without augmentation ('none', the
      baseline), with one augmented copy per example from each operation (EDA's four together
      at 0.1 as in Wei & Zou, 2019; synonym replacement alone; keyboard typos; token masking),
      and with UDA consistency training on the unlabelled rest of the split.
  distill: the 2-layer student of configs/distill.py, taught by that seed's 'none' fine-tune
      (the teacher saw the same 10 labels per class), on the 10-shot set alone ('kd', the
      baseline, with the label-only student beside it), with the EDA copies, with the
      unlabelled rest as a transfer set, and with both (the augmented transfer set).
  multitask: configs/multitask.py on Banking77 and CLINC150 at 10 shots per class of each
      (proportional mixing), against each task alone for the same steps (the run's own
      single-task baselines): the paired difference per task. 'multitask_2x' trains the
      multi-task model for twice the steps (the two single-task runs' compute together).
  main_job: configs/distill.py as the README runs it (its own schedule; only the seed is
      set; 'T2'), both pairs of students, each distilled student against its label-only
      twin; 'T1' and 'T4' add the whole-split distilled student at temperatures 1 and 4.
      --teacher reuses one finished teacher for every seed (the teacher's own seed is not
      the question); without it each seed trains its own.

A run whose report.json exists is not run again: a stopped study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402  (after the path fix above)

from llmopt_jax import compare  # noqa: E402
from llmopt_jax.sweeps import stats  # noqa: E402

_STUDY = flags.DEFINE_enum('study', 'augment', ['augment', 'distill', 'multitask', 'main_job'],
                           'Which study.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Run seeds.')
_STEPS = flags.DEFINE_integer('steps', 250, 'Training steps of every run (batch 32); the '
                             "main_job study keeps configs/distill.py's own.")
_LR = flags.DEFINE_float('lr', 3e-4, "The fine-tunes' (and so the teachers') peak learning rate.")
_VARIANTS = flags.DEFINE_list('variants', [], "Only these variants ('' = all).")
_TEACHER = flags.DEFINE_string('teacher', '', 'main_job: a finished run of configs/distill.py\'s '
                               "teacher config to reuse ('' = each seed trains its own).")
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/few_shot_study', 'Where the runs live.')
_OUT = flags.DEFINE_string('out', '', 'Also write the report (markdown, plus a PNG) here.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDA = "('synonym:0.1','insert:0.1','swap:0.1','delete:0.1')"


@dataclasses.dataclass(frozen=True)
class Study:
  config: str                        # the config file every run starts from
  baseline: str                      # the variant the others are compared with
  # name -> its command-line overrides (after the study's own), or a function of --steps
  # giving them
  variants: dict[str, list[str] | Callable[[int], list[str]]]
  metrics: dict[str, str]            # table row -> where in the run's report its accuracy is


AUGMENT = Study(
    config='configs/finetune.py', baseline='none',
    variants={
        'none': [],
        'eda': [f'--config.data.augment={EDA}'],
        'synonym': ["--config.data.augment=('synonym:0.2',)"],
        'typo': ["--config.data.augment=('typo:0.05',)"],
        'mask': ["--config.data.augment=('mask:0.15',)"],
        'consistency': ['--config.consistency.weight=1.0', '--config.consistency.confidence=0.5'],
    },
    metrics={'{variant}': 'accuracy'})

DISTILL = Study(
    config='configs/distill.py', baseline='kd',
    variants={
        'kd': [],
        'kd_eda': [f'--config.data.augment={EDA}', '--config.distill.baseline=False'],
        'kd_transfer': ['--config.distill.transfer=rest', '--config.distill.baseline=False'],
        'kd_transfer_eda': [f'--config.data.augment={EDA}', '--config.distill.transfer=rest',
                            '--config.distill.baseline=False'],
    },
    metrics={'labels_only': 'rows.student_labels.accuracy', '{variant}':
             'rows.student_kd.accuracy'})

# One run of configs/multitask.py is both sides of the comparison: the multi-task model and
# each task trained alone for the same steps (its single_<task> sub-runs).
# 'multitask' holds the budget fixed (the multi-task model gets the steps one single-task
# run gets, so each task sees only its share of them); 'multitask_2x' holds the compute
# fixed (the steps of both single-task runs together, no baselines of its own), asking whether
# sharing costs anything once each task has had its steps.
MULTITASK = Study(
    config='configs/multitask.py', baseline='single',
    variants={'multitask': [],
              'multitask_2x': lambda steps: [
                  '--config.multitask.baselines=False', f'--config.train.num_steps={2 * steps}',
                  f'--config.optim.warmup_steps={2 * steps // 10}',
                  f'--config.train.eval_every={steps}', f'--config.checkpoint.every_steps={steps}']},
    metrics={**{f'{task}: single': f'single.{task}.accuracy' for task in ('banking77', 'clinc150')},
             **{f'{task}: {{variant}}': f'multi.{task}.accuracy'
                for task in ('banking77', 'clinc150')}})

# The main job itself (configs/distill.py at its own schedule) over seeds: both pairs of
# students, on the whole split and on 10 shots with the teacher labelling the rest. A seed
# moves the students' data order, dropout and 10-shot cut; --teacher shares one teacher.
# T1 and T4 redo the whole-split distilled student at another temperature (alpha stays 0.7).
MAIN_JOB = Study(
    config='configs/distill.py', baseline='labels only',
    variants={'T2': [], **{f'T{t}': [f'--config.distill.temperature={t}',
                                     f'--config.distill.temperature_end={t}',
                                     '--config.distill.baseline=False',
                                     '--config.few_shot_pair.shots_per_class=0']
                           for t in (1, 4)}},
    metrics={'whole split: labels only': 'rows.student_labels.accuracy',
             'whole split: distilled, {variant}': 'rows.student_kd.accuracy',
             '10-shot: labels only': 'rows.student_labels_10shot.accuracy',
             '10-shot: distilled, the teacher labelling the rest':
             'rows.student_kd_10shot.accuracy'})
STUDIES = {'augment': AUGMENT, 'distill': DISTILL, 'multitask': MULTITASK, 'main_job': MAIN_JOB}


def common_overrides(study: str, steps: int, seed: int) -> list[str]:
  """Every run's: the seed; but for the main job, 10 shots, a short schedule, no export."""
  if study == 'main_job':
    return [f'--config.seed={seed}']
  half = max(1, steps // 2)
  return ['--config.data.shots_per_class=10', f'--config.seed={seed}',
          f'--config.train.num_steps={steps}', f'--config.optim.warmup_steps={steps // 10}',
          f'--config.train.eval_every={half}', f'--config.checkpoint.every_steps={half}',
          *([] if study == 'multitask' else ['--config.export=False'])]


def study_overrides(study: str, workdir: str, steps: int, lr: float, seed: int) -> list[str]:
  """The fine-tunes' learning rate; a distillation's teacher (the same seed's fine-tune, or
  for the main job --teacher when given)."""
  if study in ('augment', 'multitask'):
    return [f'--config.optim.lr={lr:g}']
  if study == 'main_job':
    return [f'--config.teacher.workdir={_TEACHER.value}'] if _TEACHER.value else []
  teacher = run_dir(workdir, 'augment', steps, lr, 'none', seed)
  if not os.path.exists(os.path.join(teacher, 'report.json')):
    raise app.UsageError(f'{teacher}: no finished teacher; run --study=augment first '
                         f'(its none variant, seed {seed})')
  return [f'--config.teacher.workdir={teacher}', '--config.distill.mode=online']


def overrides(variant: list[str] | Callable[[int], list[str]], steps: int) -> list[str]:
  return variant(steps) if callable(variant) else variant


def run_dir(workdir: str, study: str, steps: int, lr: float, variant: str, seed: int) -> str:
  """Where a run lives; `lr` is the fine-tunes' (for distill: its teachers')."""
  if study == 'main_job':  # its own schedule and learning rates
    return os.path.join(workdir, study, variant, f'seed{seed}')
  return os.path.join(workdir, f'{study}_{steps}_lr{lr:g}', variant, f'seed{seed}')


def run(command: list[str], directory: str) -> float:
  """Runs `command` (a finished run is skipped); its seconds, or 0 when skipped."""
  if os.path.exists(os.path.join(directory, 'report.json')):
    return 0.0
  os.makedirs(directory, exist_ok=True)
  print('+', ' '.join(command), flush=True)
  started = time.perf_counter()
  with open(os.path.join(directory, 'study.log'), 'a', encoding='utf-8') as log:
    subprocess.run([sys.executable, *command], cwd=REPO, check=True, stdout=log,
                   stderr=subprocess.STDOUT)
  return time.perf_counter() - started


def read(report: dict, where: str) -> float | None:
  """A value of report.json by a dotted path, rows picked by their 'model'; None where the
  run has no such row (a distillation without its label-only student)."""
  node = report
  for part in where.split('.'):
    if isinstance(node, list):
      node = next((row for row in node if row.get('model') == part), None)
    else:
      node = node.get(part)
    if node is None:
      return None
  return float(node)


def main(argv: list[str]) -> None:
  del argv
  study = STUDIES[_STUDY.value]
  seeds, steps = [int(s) for s in _SEEDS.value], _STEPS.value
  names = [v for v in study.variants if not _VARIANTS.value or v in _VARIANTS.value]
  values: dict[str, dict[int, float]] = {}
  seconds: dict[str, list[float]] = {}
  commands: list[str] = []
  for seed in seeds:  # seed-major: an early stop still leaves paired seeds
    for name in names:
      directory = run_dir(_WORKDIR.value, _STUDY.value, steps, _LR.value, name, seed)
      command = ['main.py', f'--config={study.config}',
                 *common_overrides(_STUDY.value, steps, seed),
                 *study_overrides(_STUDY.value, _WORKDIR.value, steps, _LR.value, seed),
                 *overrides(study.variants[name], steps), f'--workdir={directory}']
      commands.append(' '.join(command))
      took = run(command, directory)
      if took:
        seconds.setdefault(name, []).append(took)
      with open(os.path.join(directory, 'report.json'), encoding='utf-8') as f:
        report = json.load(f)
      found = {row.format(variant=name): value for row, where in study.metrics.items()
               if (value := read(report, where)) is not None}
      for row, value in found.items():
        values.setdefault(row, {})[seed] = value
      print(f'{name} seed {seed}: ' + ', '.join(f'{row} {v:.4f}' for row, v in found.items()),
            flush=True)
  text = render(study, values, seconds, commands, steps)
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(text)
    plot(values, study.baseline, os.path.splitext(_OUT.value)[0] + '.png')


def render(study: Study, values: dict[str, dict[int, float]], seconds: dict[str, list[float]],
           commands: list[str], steps: int) -> str:
  rows = [row for group, members in groups(values).items()
          for row in stats.ablation(members, group + study.baseline, maximize=True)]

  def points(s: stats.Summary | None) -> str:
    if s is None:
      return ''
    return f'{100 * s.mean:+.2f} ± {100 * s.std:.2f} [{100 * s.ci_low:+.2f}, {100 * s.ci_high:+.2f}]'

  table = compare.markdown_table(
      ['variant', 'seeds', 'test accuracy (mean ± std)', 'per seed',
       f'vs {study.baseline}, points (mean ± std [95% interval])', 's per run'],
      [[r.variant, r.summary.n, f'{r.summary.mean:.4f} ± {r.summary.std:.4f}',
        ' '.join(f'{values[r.variant][s]:.4f}' for s in sorted(values[r.variant])),
        points(r.vs_baseline),
        f'{sum(seconds[r.variant]) / len(seconds[r.variant]):.0f}'
        if seconds.get(r.variant) else '']
       for r in rows])
  when = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
  what = {'augment': 'MiniLM fine-tuned on 10 labelled Banking77 queries per class, without '
                     'and with augmentation or consistency training',
          'distill': "the 2-layer student of configs/distill.py taught by that seed's 10-shot "
                     'fine-tune, on the 10-shot set alone, with augmented copies, with the '
                     'unlabelled rest as a transfer set, and with both',
          'multitask': 'MiniLM fine-tuned on Banking77 and CLINC150 at once (10 labelled '
                       'queries per class of each, proportional mixing) against each task '
                       'alone for the same steps',
          'main_job': "configs/distill.py's two pairs of 2-layer students (labels only and "
                      'distilled): on the whole training split, and on 10 labelled queries '
                      'per class with the teacher also labelling the rest of the split'
          }[_STUDY.value]
  test_split = ('the whole test split of each task'
                if _STUDY.value == 'multitask' else
                'the whole Banking77 test split (3,080 queries)')
  schedule = ('' if _STUDY.value == 'main_job' else f' --steps={steps} --lr={_LR.value:g}')
  return (f'# Banking77 over seeds: {_STUDY.value} study\n\n'
          f'**What was measured.** Test accuracy of {what}, over seeds.\n\n'
          f'**Command.** `python experiments/few_shot_study.py --study={_STUDY.value} '
          f'--seeds={",".join(_SEEDS.value)}{schedule}'
          + (f' --teacher={_TEACHER.value}' if _TEACHER.value else '')
          + (f' --variants={",".join(_VARIANTS.value)}' if _VARIANTS.value else '') + '`\n\n'
          f'**Date.** {when}. **Machine.** {cpu_model()}, {os.cpu_count()} CPU cores, no GPU, '
          f'{platform.platform()}; load average at the end {os.getloadavg()[0]:.1f} (runs '
          f'of other studies and tests may share the cores: the seconds per run are not a '
          f'benchmark).\n\n'
          f'Test accuracy on {test_split}, each run at its best validation step; paired '
          f'differences per seed against the `{study.baseline}` row of the same group.\n\n'
          f'{table}\n## Runs\n\n' + '\n'.join(f'    {c}' for c in commands) + '\n')


def groups(values: dict[str, dict[int, float]]) -> dict[str, dict[str, dict[int, float]]]:
  """The rows by their group, the prefix up to ': ' ('' for none): each group is compared
  with its own baseline row (a task's single-task run, a pair's label-only student)."""
  grouped: dict[str, dict[str, dict[int, float]]] = {}
  for row, by_seed in values.items():
    group = row.rpartition(': ')[0]
    grouped.setdefault(group + ': ' if group else '', {})[row] = by_seed
  return grouped


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def plot(values: dict[str, dict[int, float]], baseline: str, path: str) -> None:
  """Per-seed test accuracy of each variant, the mean as a bar."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(values)
  fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.5))
  for i, name in enumerate(names):
    seeds = sorted(values[name])
    points = [100 * values[name][s] for s in seeds]
    is_baseline = name.rpartition(': ')[2] == baseline
    ax.bar(i, sum(points) / len(points), color='tab:orange' if is_baseline else 'tab:blue',
           alpha=0.5)
    ax.scatter([i] * len(points), points, color='black', s=12, zorder=3)
  ax.set_xticks(range(len(names)), names, rotation=20, ha='right')
  low = min(100 * v for by_seed in values.values() for v in by_seed.values())
  ax.set_ylim(low - 3, None)
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'{_STUDY.value}: bars = mean, dots = seeds (baseline {baseline} in orange)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
