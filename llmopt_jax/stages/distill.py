"""Stage `distill`: a teacher into a smaller student, and a table of what it bought.

Chain: the teacher (a finished fine-tune or pretrain workdir, or trained first inside
<workdir>/teacher) -> its parameters on the mesh as the step's constants -> two students of
the same size from the same start (every k-th block of the pretrained model the teacher was
fine-tuned from, or of the teacher itself, or scratch): one on the labels only
(<workdir>/student_labels), one distilled (<workdir>/student_kd), each through the spine's
loop with its own checkpoints and the same batches -> every model scored on the same held-out
batches, sized from its arrays, timed at batch 1 and 64 -> report.md / report.json.

Every sub-run resumes like any run, so an interrupted distillation continues where it stopped
and a finished one only rebuilds the report. The teacher's tensors never enter a student's
state, optimizer or checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from llmopt_jax import compare, stages, workdir as workdir_lib
from llmopt_jax import metrics as metrics_lib
from llmopt_jax import sharding
from llmopt_jax.distill import cache, objective, student as student_lib
from llmopt_jax.hf.load import build
from llmopt_jax.stages import distill_tasks
from llmopt_jax.train import loop, step as step_lib, trained

# Where a student's weights start: the layers of the model the teacher was fine-tuned from
# (the controlled comparison: the label-only student sees nothing of the trained teacher), of
# the trained teacher itself (DistilBERT-style; the label-only student then inherits the
# teacher's task knowledge through its weights), or random.
STUDENT_INITS = ('pretrained', 'teacher', 'scratch')


@dataclasses.dataclass(frozen=True)
class Teacher:
  workdir: str
  graphdef: nnx.GraphDef
  params: nnx.State             # on the mesh, in config.teacher.dtype
  config: Any                   # its TransformerConfig
  head: Any                     # its HeadConfig, or None for a language model


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  _check_fields(config)  # before the teacher, which may take a while to train
  teacher_dir = stages.finished_run(config.teacher.workdir, 'config.teacher.workdir',
                                    os.path.join(workdir, 'teacher'), config.teacher.config,
                                    config.task)
  problem = distill_tasks.make(config, teacher_dir)
  mesh, rules = sharding.from_config(config.mesh)
  teacher = _load_teacher(config, teacher_dir, problem)
  base_task = problem.student_task

  rows = [variant_row('teacher', teacher.graphdef, teacher.params, problem, config, mesh, rules)]
  runs = [('student_kd', True)]
  if config.distill.baseline:
    runs.insert(0, ('student_labels', False))
  # The students share one training iterator; each starts it at the same place, so both see
  # the same batches in the same order (a resumed run restores its own position anyway).
  data_start = base_task.train_data.get_state()
  for name, distilled in runs:
    task = student_task(config, workdir, base_task, teacher, problem, distilled)
    subdir = os.path.join(workdir, name)
    stages.log(f'Training {name} ({"distilled" if distilled else "labels only"}) in {subdir}.')
    base_task.train_data.set_state(data_start)
    loop.train(config, subdir, task)
    _, params = trained.load_params(config, subdir, task)
    student_graphdef = nnx.graphdef(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))).student)
    rows.append(
        variant_row(name, student_graphdef, params['student'], problem, config, mesh, rules))
  report = {'rows': rows, 'wall_time_s': time.perf_counter() - started,
            'teacher_workdir': teacher_dir, 'distill': config.distill.to_dict()}
  _write_report(workdir, report, problem)
  return report


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """The distill and student fields that can be checked without knowing the teacher."""
  if config.student.init not in STUDENT_INITS:
    raise ValueError(f'config.student.init={config.student.init!r}; choose from '
                     f'{STUDENT_INITS}')
  if config.student.num_layers < 1:
    raise ValueError(f'config.student.num_layers={config.student.num_layers}; must be >= 1')
  fields = ml_collections.ConfigDict(config.distill.to_dict())
  fields.layer_map = ''  # checked against the teacher's depth once it is known
  objective.DistillConfig.from_config(fields, config.train.num_steps, 1, 1)


def _load_teacher(config, teacher_dir: str, problem) -> Teacher:
  """The teacher's best checkpoint on this run's mesh, cast to `config.teacher.dtype`."""
  teacher_config = trained.read_config(teacher_dir)
  teacher_config.mesh = config.mesh  # the teacher lives on the student's mesh
  task = problem.teacher_task(teacher_config, teacher_dir)
  _, params = trained.load_params(teacher_config, teacher_dir, task)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  head = getattr(model, 'head', None)
  dtype = config.teacher.dtype
  model_config = model.config.replace(dtype=dtype, param_dtype=dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(model_config, head, nnx.Rngs(0))))
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  return Teacher(teacher_dir, graphdef, params, model.config, head)


def student_task(config, workdir: str, base: loop.Task, teacher: Teacher, problem,
                  distilled: bool) -> loop.Task:
  """The base task (data, eval) with a student model and, if `distilled`, the KD loss."""
  ls, lt = config.student.num_layers, teacher.config.num_layers
  if not 1 <= ls <= lt:
    raise ValueError(f'config.student.num_layers={ls}; must lie in [1, {lt}] (the teacher\'s)')
  _check_fields(config)
  if config.student.init == 'pretrained' and base.pretrained is None:
    raise ValueError('config.student.init=pretrained: this task has no pretrained starting '
                     'point; use teacher or scratch')
  spec = objective.DistillConfig.from_config(config.distill, config.train.num_steps, ls, lt)
  student_config = teacher.config.replace(
      num_layers=ls, dtype=config.student.dtype, param_dtype='float32')
  layers = student_lib.parse_teacher_layers(config.student.teacher_layers, ls, lt)
  projections = len(spec.layer_map) if distilled and spec.hidden_weight else 0

  def build_model(rngs: nnx.Rngs) -> student_lib.DistillStudent:
    return student_lib.DistillStudent(
        build(student_config, teacher.head, rngs), student_dim=student_config.embed_dim,
        teacher_dim=teacher.config.embed_dim, num_projections=projections, rngs=rngs)

  def from_layers(mesh, rules) -> nnx.State:
    """Every k-th block (and the rest) of the pretrained model or of the trained teacher."""
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(nnx.Rngs(config.seed))), nnx.Param)
    fresh = jax.jit(lambda: nnx.state(build_model(nnx.Rngs(config.seed)), nnx.Param),
                    out_shardings=sharding.tree_shardings(abstract, mesh, rules))()
    source = teacher.params if config.student.init == 'teacher' else base.pretrained(mesh, rules)
    return student_lib.from_teacher(fresh, source, layers)

  if distilled:
    loss_fn = objective.make_loss_fn(spec, problem.io, teacher.graphdef)
  else:
    loss_fn = lambda model, batch, rngs, context: base.loss_fn(model.student, batch, rngs, context)
  train_data = base.train_data
  if distilled and spec.mode == 'cached':
    train_data = cache.WithTeacherCache(
        train_data, problem.teacher_cache(config, workdir, teacher))
  return dataclasses.replace(
      base, build_model=build_model, loss_fn=loss_fn,
      eval_fn=lambda model, batch: base.eval_fn(model.student, batch), train_data=train_data,
      pretrained=None if config.student.init == 'scratch' else from_layers,
      constants=(lambda mesh, rules: teacher.params) if distilled and spec.mode == 'online'
      else None,
      extend_params=None, params_transform=None, frozen=None)


def load_student(distill_dir: str, name: str = 'student_kd'
                 ) -> tuple[nnx.GraphDef, nnx.State, Any, Any]:
  """(graphdef, params on the run's mesh, model config, head) of the best checkpoint of
  student `name` ('student_kd' or 'student_labels') of the finished distill run in
  `distill_dir`, e.g. to quantize it."""
  config = trained.read_config(distill_dir)
  subdir = os.path.join(distill_dir, name)
  if name not in ('student_kd', 'student_labels') or not os.path.isdir(subdir):
    raise ValueError(f'{distill_dir} has no student {name!r}; choose student_kd or '
                     f'student_labels')
  teacher_dir = config.teacher.workdir or os.path.join(distill_dir, 'teacher')
  problem = distill_tasks.make(config, teacher_dir)
  teacher = _load_teacher(config, teacher_dir, problem)
  task = student_task(config, distill_dir, problem.student_task, teacher, problem,
                      distilled=name == 'student_kd')
  _, params = trained.load_params(config, subdir, task)
  student = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))).student
  return nnx.graphdef(student), params['student'], student.config, getattr(student, 'head', None)


def variant_row(name: str, graphdef: nnx.GraphDef, params: nnx.State, problem, config, mesh,
                rules, size: tuple[int, int] | None = None) -> dict[str, Any]:
  """One row of the table: quality on the held-out batches, latency, and size: (parameters,
  bytes) from the arrays, or `size` where the caller knows better (quantized weights are
  sized from their files)."""
  eval_step = step_lib.jit_eval_step(
      step_lib.make_eval_step(graphdef, problem.eval_fn),
      jax.tree.map(lambda x: x.sharding, params), mesh, rules)
  sums = metrics_lib.total(eval_step(params, sharding.shard_batch(b, mesh, rules))
                           for b in problem.score_batches)
  count, nbytes = size or compare.size_of(params)
  latency = compare.latency_per_query(graphdef, params, problem.forward, problem.make_batch)
  row = {'model': name, 'params': count, 'bytes': nbytes, **problem.quality(sums),
         **{f'latency_ms_b{b}': 1e3 * s for b, s in latency.items()}}
  stages.log(f'{name}: ' + ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                               for k, v in row.items() if k != 'model'))
  return row


def _write_report(workdir: str, report: dict[str, Any], problem) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  headers = ['model', 'params', 'MiB', *problem.quality_columns, 'ms/query (b=1)',
             'ms/query (b=64)']
  table = compare.markdown_table(headers, [
      [r['model'], f'{r["params"]:,}', f'{r["bytes"] / 2**20:.1f}',
       *(f'{r[c]:.4f}' for c in problem.quality_columns),
       f'{r["latency_ms_b1"]:.2f}', f'{r["latency_ms_b64"]:.3f}'] for r in report['rows']])
  text = (f'# Distillation: {problem.description}\n\n{table}\n'
          f'Wall time {report["wall_time_s"] / 60:.1f} min; teacher {report["teacher_workdir"]}.\n')
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  print('\n' + table + f'Report in {workdir}/report.md', flush=True)
