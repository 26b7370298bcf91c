"""Stage `distill`: a teacher into a smaller student, and a table of what it bought.

Chain: the teacher (a finished fine-tune or pretrain workdir, or trained first inside
<workdir>/teacher) -> its parameters on the mesh as the step's constants -> two students of
the same size from the same start (`config.student.init`): one on the labels only
(<workdir>/student_labels), one distilled (<workdir>/student_kd), each through the loop with
its own checkpoints, its own model card and the same batches -> every model scored on the
same held-out batches, sized from its arrays, timed at batch 1 and 64 -> report.md / .json.
Unless the run is already few-shot, a second pair follows (`distill/few_shot_pair.py`,
<workdir>/student_{labels,kd}_<K>shot): the same students with K labels per class, the
teacher labelling the rest of the split for the distilled one: where distillation pays.

With a few-shot split (config.data.shots_per_class) the students learn from K labelled
examples per class, and the teacher from the cut config.teacher.shots_per_class names (the
same by default; `distill/teacher_labels.py`); a transfer set (config.distill.transfer,
`distill/transfer.py`) adds text only the teacher labels.

Every sub-run resumes like any run, so an interrupted distillation continues where it stopped
and a finished one only rebuilds the report. Fields: configs/distill.py and
`llmopt_jax/distill/objective.py` (`DistillConfig`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from llmopt_jax import report, sharding, stages
from llmopt_jax import workdir as workdir_lib
from llmopt_jax.distill import few_shot_pair, student_task, teacher_labels
from llmopt_jax.tasks import finished, problem as problem_lib, scoring
from llmopt_jax.train import loop
from llmopt_jax.train.config import TrainConfig


def run(config, workdir: str) -> dict[str, Any]:
  train = TrainConfig.from_config(config)  # every bad field fails before anything is written
  student_task.check_fields(config)  # and before the teacher, which may take a while to train
  pair = few_shot_pair.pair_config(config)
  pair_train = None if pair is None else TrainConfig.from_config(pair)
  if pair is not None:
    student_task.check_fields(pair)
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  # A teacher trained here learns from the labels config.teacher.shots_per_class names.
  teacher_dir = stages.finished_run(config.teacher.workdir, 'config.teacher.workdir',
                                    os.path.join(workdir, 'teacher'),
                                    teacher_labels.teacher_config(config), config.task)
  mesh, rules = sharding.from_config(config.mesh)
  teacher = finished.load(teacher_dir, mesh, rules, dtype=config.teacher.dtype)
  teacher_labels.check_teacher(config, teacher)
  problem = problem_lib.make(config, teacher, workdir)

  rows = [scoring.score('teacher', teacher.graphdef, teacher.params, problem, mesh, rules)]
  rows += _students(config, train, workdir, teacher, problem, mesh, rules, '')
  notes = []
  if pair is not None:
    pair_problem = problem_lib.make(pair, teacher, workdir)
    rows += _students(pair, pair_train, workdir, teacher, pair_problem,
                      mesh, rules, few_shot_pair.suffix(pair))
    notes.append(few_shot_pair.describe(pair))
  record = {'rows': [r.to_json() for r in rows], 'wall_time_s': time.perf_counter() - started,
            'teacher_workdir': teacher_dir, 'distill': config.distill.to_dict()}
  report.write(
      workdir, record, record['rows'], scoring.table_columns(problem.quality_columns),
      title=f'Distillation: {problem.description}',
      notes=[f'Wall time {record["wall_time_s"] / 60:.1f} min; teacher {teacher_dir}.', *notes])
  return record


def _students(config, train: TrainConfig, workdir: str, teacher: finished.FinishedModel,
              problem: problem_lib.Problem, mesh, rules: sharding.Rules,
              suffix: str) -> list[scoring.VariantRow]:
  """Trains (or resumes, or finds finished) the label-only and the distilled student of
  `config` in <workdir>/student_{labels,kd}<suffix>; their scored rows."""
  runs = [('student_kd', True)]
  if config.distill.baseline:
    runs.insert(0, ('student_labels', False))
  # The students share one training iterator; each starts it at the same place, so both see
  # the same batches in the same order (a resumed run restores its own position anyway).
  data_start = problem.task.train_data.get_state()
  rows = []
  for name, distilled in runs:
    name += suffix
    subdir = os.path.join(workdir, name)
    task = student_task.student_task(config, workdir, teacher, problem, distilled)
    report.say(f'Training {name} ({"distilled" if distilled else "labels only"}) in {subdir}.')
    problem.task.train_data.set_state(data_start)
    loop.train(train, subdir, task)
    finished.write_card(subdir, student_task.student_card(config, teacher))
    student = finished.load(subdir, mesh, rules)
    rows.append(scoring.score(name, student.graphdef, student.params, problem, mesh, rules))
  return rows
