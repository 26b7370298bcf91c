"""The student of a distillation run, and how it starts from its teacher.

`DistillStudent` holds the student model and, when hidden states are distilled between models
of different widths, one learned linear map per mapped layer from the student's width to the
teacher's (TinyBERT, Jiao et al. 2020). The maps train with the student and are saved in its
checkpoints (they are the student's, not the teacher's), but they are not part of the model a
stage exports or evaluates: `.student` is.

Starting from the teacher (DistilBERT, Sanh et al. 2019): the student is the teacher with
fewer blocks, so it takes the teacher's embeddings, final norm and head, and block i takes
teacher block `teacher_layers[i]` (evenly spaced, first and last included, by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.models import layers


class DistillStudent(nnx.Module):
  """`student` plus `projections` (None when the widths agree or no hidden state is
  distilled)."""

  def __init__(self, student: nnx.Module, *, student_dim: int, teacher_dim: int,
               num_projections: int, rngs: nnx.Rngs):
    self.student = student
    self.projections = nnx.data(None)  # data: the List below may replace it
    if num_projections and student_dim != teacher_dim:
      self.projections = nnx.List([
          layers.Dense(student_dim, teacher_dim, ('embed', None), init_std=student_dim ** -0.5,
                       use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
          for _ in range(num_projections)])

  def project(self, i: int, hidden: jax.Array) -> jax.Array:
    """Student hidden state [B,T,Ds] of the i-th mapped layer in the teacher's width."""
    return hidden if self.projections is None else self.projections[i](hidden)


def evenly_spaced_layers(num_student: int, num_teacher: int) -> tuple[int, ...]:
  """0-based teacher blocks for the student's, spread from the first to the last."""
  if num_student == 1:
    return (num_teacher - 1,)
  return tuple(round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student))


def parse_teacher_layers(text: str, num_student: int, num_teacher: int) -> tuple[int, ...]:
  """`config.student.teacher_layers`: '' = evenly spaced, else comma-separated 0-based ids."""
  if not text:
    return evenly_spaced_layers(num_student, num_teacher)
  try:
    chosen = tuple(int(p) for p in text.split(','))
  except ValueError:
    raise ValueError(f'config.student.teacher_layers={text!r}: expected comma-separated '
                     f'integers') from None
  if len(chosen) != num_student or not all(0 <= c < num_teacher for c in chosen):
    raise ValueError(f'config.student.teacher_layers={text!r}: expected {num_student} teacher '
                     f'blocks in [0, {num_teacher})')
  return chosen


def from_teacher(student_params: nnx.State, teacher_params: nnx.State,
                 teacher_layers: Sequence[int]) -> nnx.State:
  """The student's parameters (a `DistillStudent` state) with every student-model parameter
  copied from the teacher: block i from teacher block `teacher_layers[i]`, the rest from the
  same path. Cast to the student's dtype and placed on the student's shardings."""
  teacher = dict(nnx.to_flat_state(teacher_params))
  flat = dict(nnx.to_flat_state(student_params))
  for path, variable in flat.items():
    if path[0] != 'student':
      continue  # the projections keep their fresh initialisation
    source = _teacher_path(path[1:], teacher_layers)
    if source not in teacher:
      raise ValueError(f'config.student.init=teacher: the teacher has no parameter '
                       f'{"/".join(map(str, source))} for the student\'s {_name(path)}')
    value = teacher[source].get_value()
    mine = variable.get_value()
    if value.shape != mine.shape:
      raise ValueError(f'config.student.init=teacher: student parameter {_name(path)} has '
                       f'shape {mine.shape}, the teacher\'s {value.shape}; a student of another '
                       f'width needs config.student.init=scratch')
    variable.set_value(jax.device_put(value.astype(mine.dtype), mine.sharding))
  return nnx.from_flat_state(flat)


def _teacher_path(path: tuple[Any, ...], teacher_layers: Sequence[int]) -> tuple[Any, ...]:
  if len(path) > 1 and path[0] == 'blocks':
    return ('blocks', teacher_layers[int(path[1])]) + path[2:]
  if len(path) > 2 and path[1] == 'blocks':  # a classifier's backbone
    return (path[0], 'blocks', teacher_layers[int(path[2])]) + path[3:]
  return path


def _name(path: tuple[Any, ...]) -> str:
  return '/'.join(map(str, path))
