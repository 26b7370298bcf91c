"""Stage `multitask`: one encoder fine-tuned on several classification tasks at once, and a
table of what sharing it bought against each task trained alone.

Chain: each task's labelled texts (`config.tasks.<name>`: Banking77, CLINC150 or a user's
CSV/TSV/JSONL file) -> the starting point's tokenizer -> one pretrained encoder + a classifier
with a block of columns per task (`tasks/multitask.py`) -> the shared loop, its batches drawn
task by task by the mixture (`data/mixture.py`; its position is saved with every checkpoint,
so a resumed run reads the same batches) -> the best checkpoint scored on each task's test
split. With `config.multitask.baselines`, the same model on each task alone in
<workdir>/single_<task>: the same starting weights, seed, batch size and number of steps (the
same budget), only that task's batches (`tasks/multitask.py` `Plan.build`), each an ordinary
sub-run that resumes like any run -> report.md / report.json: per task, multi-task against
single-task test accuracy and macro-F1, and the difference.
Fields: configs/multitask.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import ml_collections
import numpy as np

from llmopt_jax import report, workdir as workdir_lib
from llmopt_jax.tasks import finished, multitask
from llmopt_jax.train import loop, trained
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  train = TrainConfig.from_config(config)
  plan = multitask.plan(config)  # every bad field, and every task's data, fails here
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  built = plan.build(config)
  report.say(f'Multi-task fine-tuning of {plan.start.path} on ' + ', '.join(
      f'{t.name} ({len(t.splits["train"])} examples, {t.splits.num_classes} classes, rate '
      f'{plan.rates[t.name]:.3f})' for t in plan.tasks) + f'; mixing {plan.spec.mixing}; '
      f'{built.counts.trainable:,} trainable parameters.')
  multi, batches = _train_and_score(train, workdir, built, built.card)
  single = {}
  for task in plan.tasks if plan.spec.baselines else ():
    subdir = os.path.join(workdir, f'single_{task.name}')
    report.say(f'Training {task.name} alone in {subdir} ({train.num_steps} steps: the same '
               f'budget).')
    alone = plan.build(config, task)
    single.update(_train_and_score(
        train, subdir, alone, dataclasses.replace(alone.card, run_config='../config.json'))[0])
  record = {
      'rows': [_row(t.name, multi, single) for t in plan.tasks],
      'multi': multi, 'single': single,
      'mixture': {'mixing': plan.spec.mixing, 'temperature': plan.spec.temperature,
                  'cap': plan.spec.cap, 'rates': plan.rates, 'batches': batches},
      'blocks': {name: list(built.blocks.span(name)) for name in built.blocks.names},
      'budget': {'num_steps': train.num_steps, 'batch_size': train.batch_size},
      'data': {t.name: t.splits.metadata() for t in plan.tasks},
      'model': plan.start.path, 'wall_time_s': time.perf_counter() - started}
  report.write(workdir, record, record['rows'], _columns(bool(single)),
               title=f'Multi-task fine-tuning: {", ".join(built.blocks.names)}',
               notes=_notes(record, bool(single)))
  return record


def _train_and_score(train: TrainConfig, directory: str, built: multitask.MultiTask,
                     card: finished.ModelCard) -> tuple[dict[str, dict], dict[str, int]]:
  """Trains (or resumes, or finds finished) one run; (test report per task, batches each
  task had)."""
  summary = loop.train(train, directory, built.task)
  finished.write_card(directory, card)
  sums = trained.evaluate_checkpoint(train, directory, built.task, summary['best_step'],
                                     built.test)
  reports = multitask.task_reports(np.asarray(sums['confusion'][0]), built)
  for one in reports.values():
    one['best_step'] = summary['best_step']
  return reports, built.task.train_data.get_state()['mixture']


def _row(name: str, multi: dict[str, dict], single: dict[str, dict]) -> dict[str, Any]:
  row = {'task': name, 'test_examples': multi[name]['num_examples'],
         'multi_accuracy': multi[name]['accuracy'], 'multi_macro_f1': multi[name]['macro_f1']}
  if name in single:
    for metric in ('accuracy', 'macro_f1'):
      row[f'single_{metric}'] = single[name][metric]
      row[f'{metric}_difference'] = multi[name][metric] - single[name][metric]
  return row


def _columns(baselines: bool) -> list[report.Column]:
  points = lambda key: lambda row: f'{100 * row[key]:+.2f}'  # noqa: E731
  columns = [report.field('task', 'task'), report.field('test examples', 'test_examples', ',.0f'),
             report.field('multi-task accuracy', 'multi_accuracy', '.4f')]
  if baselines:
    columns += [report.field('single-task accuracy', 'single_accuracy', '.4f'),
                report.Column('difference (points)', points('accuracy_difference'))]
  columns.append(report.field('multi-task macro-F1', 'multi_macro_f1', '.4f'))
  if baselines:
    columns += [report.field('single-task macro-F1', 'single_macro_f1', '.4f'),
                report.Column('difference (points)', points('macro_f1_difference'))]
  return columns


def _notes(record: dict[str, Any], baselines: bool) -> list[str]:
  mix = record['mixture']
  shares = ', '.join(f'{name} {rate:.3f} ({mix["batches"][name]} batches)'
                     for name, rate in mix['rates'].items())
  budget = record['budget']
  notes = [(f'Mixing {mix["mixing"]}: {shares}. Budget {budget["num_steps"]} steps of '
            f'{budget["batch_size"]} examples; wall time {record["wall_time_s"] / 60:.1f} min.')]
  if baselines:
    notes.append('Single-task runs (single_<task>/): the same model, start, steps and batch '
                 'size on that task\'s batches alone; difference = multi-task minus single-task.')
  return notes
