"""A student's `Task`: the problem's data and evaluation, a shallower copy of the teacher, and
either the labels alone or the distillation objective against the teacher.

Both students of a distillation are built here from the same start (`config.student.init`):
every k-th block of the pretrained model the teacher was fine-tuned from, of the trained
teacher itself, or random. The teacher's parameters reach the loss as the step's constants
(online) or through a cache of its top-k logits (cached); they never enter the student's
state, optimizer or checkpoints.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.distill import cache, objective, student as student_lib, teacher_labels, transfer
from llmopt_jax.hf.load import build
from llmopt_jax.tasks.finished import FinishedModel, ModelCard
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train.task import Task

# Where a student's weights start: the layers of the model the teacher was fine-tuned from
# (the controlled comparison: the label-only student sees nothing of the trained teacher), of
# the trained teacher itself (DistilBERT-style; the label-only student then inherits the
# teacher's task knowledge through its weights), or random.
STUDENT_INITS = ('pretrained', 'teacher', 'scratch')
PARAMS_KEY = 'student'  # the student model's subtree of a `DistillStudent`'s parameters


def check_fields(config: ml_collections.ConfigDict) -> None:
  """The distill and student fields that can be checked without knowing the teacher."""
  if config.student.init not in STUDENT_INITS:
    raise ValueError(f'config.student.init={config.student.init!r}; choose from '
                     f'{STUDENT_INITS}')
  if config.student.num_layers < 1:
    raise ValueError(f'config.student.num_layers={config.student.num_layers}; must be >= 1')
  fields = ml_collections.ConfigDict(config.distill.to_dict())
  fields.layer_map = ''  # checked against the teacher's depth once it is known
  objective.DistillConfig.from_config(fields, config.train.num_steps, 1, 1)
  _check_training_text(config)
  teacher_labels.teacher_cut(config)


def _check_training_text(config: ml_collections.ConfigDict) -> None:
  """The text the students train on suits the distillation mode (one-line errors)."""
  if config.get('task', 'classification') == 'classification':
    augment = AugmentConfig.from_config(config.data)
    if config.distill.mode == 'cached' and augment.enabled:
      raise ValueError(f'config.data.augment={config.data.augment!r} needs '
                       f'config.distill.mode=online: the cached teacher holds the logits of the '
                       f'original training texts, not of their augmented copies')
  weight = config.get('consistency', {}).get('weight', 0)
  if weight:
    raise ValueError(f'config.consistency.weight={weight}: the students of a distillation '
                     f'train without consistency training; set 0 (config.distill.transfer '
                     f'gives the distilled student unlabelled text through the teacher)')
  transfer.transfer_stream(config)


def student_card(config: ml_collections.ConfigDict, teacher: FinishedModel) -> ModelCard:
  """The card of a student of `teacher` (written into the student's own directory)."""
  model = teacher.card.model.replace(num_layers=config.student.num_layers,
                                     dtype=config.student.dtype, param_dtype='float32')
  return dataclasses.replace(teacher.card, stage='distill', model=model, lora=None,
                             params_key=PARAMS_KEY, tokenizer_dir=teacher.tokenizer_dir,
                             run_config='../config.json')


def student_task(config: ml_collections.ConfigDict, workdir: str, teacher: FinishedModel,
                 problem: Problem, distilled: bool) -> Task:
  """The problem's task (data, eval) with a student model and, if `distilled`, the KD loss."""
  card = student_card(config, teacher)
  ls, lt = card.model.num_layers, teacher.card.model.num_layers
  if not 1 <= ls <= lt:
    raise ValueError(f'config.student.num_layers={ls}; must lie in [1, {lt}] (the teacher\'s)')
  check_fields(config)
  base = problem.task
  if config.student.init == 'pretrained' and base.pretrained is None:
    raise ValueError('config.student.init=pretrained: this task has no pretrained starting '
                     'point; use teacher or scratch')
  spec = objective.DistillConfig.from_config(config.distill, config.train.num_steps, ls, lt)
  layers = student_lib.parse_teacher_layers(config.student.teacher_layers, ls, lt)
  projections = len(spec.layer_map) if distilled and spec.hidden_weight else 0

  def build_model(rngs: nnx.Rngs) -> student_lib.DistillStudent:
    return student_lib.DistillStudent(
        build(card.model, card.head, rngs), student_dim=card.model.embed_dim,
        teacher_dim=teacher.card.model.embed_dim, num_projections=projections, rngs=rngs)

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
