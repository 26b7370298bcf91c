"""The distillation objective: a loss function for the spine's one train step.

    objective = (1 - alpha) * hard-label loss + alpha * logit KD
              + hidden_weight * hidden-state loss + attention_weight * attention loss

Each term is a mean over its own positions (examples or tokens) in the batch; alpha and the
temperature follow schedules of the step. The teacher's parameters arrive as the step's
constants (`context.constants`): the teacher is merged from them and run without dropout,
inside the same jitted step, sharded on the same mesh, never updated. In cached mode the
teacher is not needed at all: its top-k logits ride in the batch (`teacher_values`,
`teacher_indices`, see `cache.py`). With a transfer set (`transfer.py`) the batch's transfer
rows join it inside the step: the distillation terms cover them, the hard-label loss does not.

Which terms exist is decided once, when the loss is built, from the config; the traced step
has no branches on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llmopt_jax.distill import losses, schedules, transfer as transfer_lib
from llmopt_jax.distill.student import DistillStudent
from llmopt_jax.metrics import MetricSums

MODES = ('online', 'cached')


@dataclasses.dataclass(frozen=True)
class ModelIO:
  """How a task feeds a model and reads its outputs, for student and teacher alike."""
  # (model, batch, rngs, intermediates) -> (logits, Intermediates or None)
  forward: Callable[[nnx.Module, dict, nnx.Rngs | None, bool], tuple[jax.Array, Any]]
  # (logits, batch) -> metric sums with the hard-label 'loss' among them
  hard_metrics: Callable[[jax.Array, dict], MetricSums]
  kd_weights: Callable[[dict], jax.Array]     # weights of the logit positions: [B] or [B, T]
  token_weights: Callable[[dict], jax.Array]  # weights of token positions [B, T]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """`config.distill`, checked, with its schedules built."""
  mode: str
  alpha: schedules.Schedule
  temperature: schedules.Schedule
  divergence: str
  hidden_weight: float
  hidden_kind: str
  attention_weight: float
  attention_kind: str
  layer_map: tuple[int, ...]   # 1-based teacher block whose output student block i learns
  # Batches carry transfer rows (`transfer.py`): text the teacher labels, label weight 0.
  transfer: bool = False

  @property
  def needs_intermediates(self) -> bool:
    return self.hidden_weight > 0 or self.attention_weight > 0

  @classmethod
  def from_config(cls, d: ml_collections.ConfigDict, num_steps: int, num_student_layers: int,
                  num_teacher_layers: int) -> DistillConfig:
    _choice('mode', d.mode, MODES)
    _choice('divergence', d.divergence, losses.DIVERGENCES)
    _choice('hidden_kind', d.hidden_kind, losses.HIDDEN_KINDS)
    _choice('attention_kind', d.attention_kind, losses.ATTENTION_KINDS)
    for name in ('alpha', 'alpha_end'):
      if not 0.0 <= d[name] <= 1.0:
        raise ValueError(f'config.distill.{name}={d[name]}; must lie in [0, 1]')
    for name in ('temperature', 'temperature_end'):
      if d[name] <= 0:
        raise ValueError(f'config.distill.{name}={d[name]}; must be positive')
    for name in ('hidden_weight', 'attention_weight'):
      if d[name] < 0:
        raise ValueError(f'config.distill.{name}={d[name]}; must be >= 0')
    if d.mode == 'cached' and (d.hidden_weight or d.attention_weight or d.divergence != 'forward'):
      raise ValueError('config.distill.mode=cached keeps only the teacher\'s top-k logits: '
                       'set hidden_weight and attention_weight to 0 and divergence=forward')
    transfer = transfer_lib.transfer_source(d)
    if d.mode == 'cached' and transfer:
      raise ValueError(f'config.distill.transfer={transfer!r} needs mode=online: the cached '
                       f'teacher holds the logits of the training texts only')
    return cls(
        mode=d.mode,
        alpha=schedules.make(d.alpha_schedule, d.alpha, d.alpha_end, num_steps,
                             field='config.distill.alpha_schedule'),
        temperature=schedules.make(d.temperature_schedule, d.temperature, d.temperature_end,
                                   num_steps, field='config.distill.temperature_schedule'),
        divergence=d.divergence, hidden_weight=float(d.hidden_weight), hidden_kind=d.hidden_kind,
        attention_weight=float(d.attention_weight), attention_kind=d.attention_kind,
        layer_map=losses.parse_layer_map(d.layer_map, num_student_layers, num_teacher_layers),
        transfer=bool(transfer))


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'config.distill.{field}={value!r}; choose from {allowed}')


def _mean(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
  return pair[0] / jnp.maximum(pair[1], 1e-9)


def make_loss_fn(cfg: DistillConfig, io: ModelIO, teacher_graphdef: nnx.GraphDef | None):
  """`loss_fn(model: DistillStudent, batch, rngs, context)` for `step.make_train_step`.

  Returns (objective * n, n, sums) with n the hard-label weight of the batch, so the step's
  division by n gives the objective; with gradient accumulation the micro-batches' objectives
  are weighted by their n. `sums` holds the hard 'loss' (comparable with a label-only run),
  each distillation term, and the scheduled alpha and temperature.
  """
  cached = cfg.mode == 'cached'
  # The rows the student and teacher read: the batch's, or with a transfer set those and its
  # transfer rows, which have KD weight 1 and label weight 0.
  rows = (transfer_lib.with_transfer_rows if cfg.transfer else
          lambda batch, kd_weights: (batch, kd_weights))

  def loss_fn(model: DistillStudent, batch: dict, rngs: nnx.Rngs | None, context) -> tuple:
    alpha, temperature = cfg.alpha(context.step), cfg.temperature(context.step)
    batch, kd_weights = rows(batch, io.kd_weights(batch))
    logits, inner = io.forward(model.student, batch, rngs, cfg.needs_intermediates)
    sums = dict(io.hard_metrics(logits, batch))
    n = sums['loss'][1]
    if cached:
      kd = losses.topk_kd(logits, batch['teacher_values'], batch['teacher_indices'],
                          kd_weights, temperature=temperature)
    else:
      teacher = nnx.merge(teacher_graphdef, context.constants)
      teacher_logits, teacher_inner = io.forward(teacher, batch, None, cfg.needs_intermediates)
      kd = losses.logit_kd(logits, teacher_logits, kd_weights,
                           temperature=temperature, divergence=cfg.divergence)
    objective = (1.0 - alpha) * _mean(sums['loss']) + alpha * _mean(kd)
    sums['kd_loss'] = kd
    if cfg.hidden_weight:
      sums['hidden_loss'] = _hidden_term(cfg, model, inner, teacher_inner, io, batch)
      objective += cfg.hidden_weight * _mean(sums['hidden_loss'])
    if cfg.attention_weight:
      sums['attention_loss'] = _attention_term(cfg, inner, teacher_inner, io, batch)
      objective += cfg.attention_weight * _mean(sums['attention_loss'])
    one = jnp.ones((), jnp.float32)
    sums['objective'] = (objective, one)
    sums['alpha'] = (alpha, one)
    sums['temperature'] = (temperature, one)
    return objective * n, n, sums
  return loss_fn


def _hidden_term(cfg: DistillConfig, model: DistillStudent, inner, teacher_inner, io: ModelIO,
                 batch: dict) -> tuple[jax.Array, jax.Array]:
  """Mean over the mapped layers of the per-token hidden-state loss; the student's state of
  block i (hidden_states[i + 1]) goes through its projection to the teacher's width."""
  weights = io.token_weights(batch)
  total, count = jnp.zeros(()), jnp.zeros(())
  for i, t in enumerate(cfg.layer_map):
    student = model.project(i, inner.hidden_states[i + 1].astype(jnp.float32))
    s, c = losses.hidden_state_loss(student, teacher_inner.hidden_states[t], weights,
                                    kind=cfg.hidden_kind)
    total, count = total + s, c
  return total / len(cfg.layer_map), count


def _attention_term(cfg: DistillConfig, inner, teacher_inner, io: ModelIO,
                    batch: dict) -> tuple[jax.Array, jax.Array]:
  """Mean over the mapped layers of the per-query attention-map loss."""
  weights = io.token_weights(batch)
  total, count = jnp.zeros(()), jnp.zeros(())
  for i, t in enumerate(cfg.layer_map):
    s, c = losses.attention_loss(inner.attentions[i], teacher_inner.attentions[t - 1], weights,
                                 kind=cfg.attention_kind)
    total, count = total + s, c
  return total / len(cfg.layer_map), count


@dataclasses.dataclass(frozen=True)
class _AsStudent:
  """The objective reads the trained model as `.student` (a DistillStudent's field)."""
  student: nnx.Module


def from_source_logits(distill: ml_collections.ConfigDict, num_steps: int, num_layers: int,
                       io: ModelIO, source_graphdef: nnx.GraphDef):
  """The loss of a model taught by the logits of the float model it was made from (QAT's
  fake-quantized copy, a pruned copy): online, logits only, the trained model its own student
  with no projections. The source's parameters are the task's constants."""
  if distill.hidden_weight or distill.attention_weight:
    raise ValueError('config.distill.hidden_weight / attention_weight: a model taught by its '
                     'own source distils logits only (no projections); set 0')
  if distill.mode != 'online':
    raise ValueError(f'config.distill.mode={distill.mode!r}: a model taught by its own source '
                     f'distils online only')
  spec = DistillConfig.from_config(distill, num_steps, num_layers, num_layers)
  kd = make_loss_fn(spec, io, source_graphdef)
  return lambda model, batch, rngs, context: kd(_AsStudent(model), batch, rngs, context)
